"""The colocated baseline (`distserve worker colocated`): one process serving both phases behind the
same router. Greedy output is token-identical to the single-process reference loop, alone and in
a batch, and both phases really ran in that one process."""

import asyncio
import random
import re
import urllib.error
import urllib.request

import aiohttp
import grpc
import pytest

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
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


async def test_a_colocated_instance_drains_on_sigterm(colocated_stack):
    """Serving mode Colocated in a pod going away: SIGTERM mid-stream, and the streams it holds
    finish in full while it reports not ready; then it exits by itself. (Last in this module: it
    leaves the process gone.)"""
    stack = colocated_stack
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 257) for _ in range(8)] for _ in range(3)]
    tokens = 120
    url = f"{stack.url}/v1/completions"
    port = stack.proc("colocated-0").http_port

    def body(p):
        return {
            "model": "tiny-llama",
            "prompt": p,
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }

    async with aiohttp.ClientSession() as session:
        running = [asyncio.create_task(complete(session, url, body(p), timeout=120)) for p in prompts]
        # Mid-stream: its decode half runs all three (the worker's own Status says so).
        async with grpc.aio.insecure_channel(stack.decode_addresses[0]) as channel:
            stub = gen_grpc.DecodeServiceStub(channel)
            for _ in range(2400):
                if (await stub.Status(gen.StatusRequest(), timeout=5)).running == 3:
                    break
                await asyncio.sleep(0.05)
        stack.terminate("colocated-0")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
            ready_status = 200
        except urllib.error.HTTPError as exc:
            ready_status = exc.code
        results = await asyncio.gather(*running)
    assert ready_status == 503  # not ready at once: the router and the Service stop sending it work
    assert [r.error for r in results] == [None] * 3
    assert [(r.status, r.chunks) for r in results] == [(200, tokens)] * 3  # none cut short
    assert await asyncio.to_thread(stack.proc("colocated-0").popen.wait, 120) == 0
