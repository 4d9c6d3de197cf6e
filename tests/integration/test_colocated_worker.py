"""The colocated baseline (`distserve worker colocated`): one process serving both phases behind the
same router. Greedy output is token-identical to the single-process reference loop, alone and in
a batch, and both phases really ran in that one process."""

import asyncio
import random
import re
import urllib.request

import aiohttp
import pytest

from distserve_worker.engine.runner import reference_greedy
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import save_tiny_model, tiny_model

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def colocated_stack(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    config = StackConfig(ModelSpec(name="tiny-llama", kind="Path", path=str(path)), colocated=1, threads=1)
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        yield stack


def _metric(text: str, name: str, role: str) -> float:
    pattern = rf'{name}\{{[^}}]*role="{role}"[^}}]*status="ok"[^}}]*\}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


async def test_colocated_serves_reference_tokens(colocated_stack):
    stack = colocated_stack
    assert [p.name for p in stack.procs] == ["colocated-0", "router"]
    model = tiny_model("llama")
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 257) for _ in range(n)] for n in (4, 9, 17, 33, 60)]
    reference = [reference_greedy(model, p, MAX_TOKENS, eos={0}) for p in prompts]
    url = f"{stack.url}/v1/completions"

    def body(p):
        return {
            "model": "tiny-llama",
            "prompt": p,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        }

    async with aiohttp.ClientSession() as session:
        alone = await complete(session, url, body(prompts[2]))
        together = await asyncio.gather(*(complete(session, url, body(p)) for p in prompts))
        streamed = await complete(session, url, body(prompts[1]) | {"stream": True})
    assert alone.status == 200 and alone.token_ids == reference[2]
    assert [r.token_ids for r in together] == reference
    assert streamed.status == 200 and streamed.chunks >= 1 and streamed.error is None
    metrics_url = f"http://127.0.0.1:{stack.proc('colocated-0').http_port}/metrics"
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    # Both phases counted by the one process: 7 requests each.
    assert _metric(text, "distserve_requests_total", "prefill") == 7
    assert _metric(text, "distserve_requests_total", "decode") == 7
