"""Bad input and dead workers, against the real stack (separate processes, tiny Llama, real gRPC).

Bad requests get a 400 in OpenAI's error shape with the reason. When a worker dies, every request
in flight on it ends with a clear error (none hangs), the KV buffer is released, and new requests
succeed once the worker is back.
"""

import asyncio
import json
import urllib.request

import aiohttp
import grpc
import pytest

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import save_tiny_model

MODEL = "tiny-llama"
DEADLINE = 240  # seconds any request may take here (a loaded 2-core CI box) before we call it hung
CONTEXT = 4096
# The fault tests need one request still streaming while a second reaches decode. A long stream
# makes that window tens of seconds wide, so the setup holds however loaded the machine is.
LONG = 3000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("llama"), max_positions=CONTEXT)
    config = StackConfig(
        ModelSpec(name=MODEL, kind="Path", path=str(path)),
        threads=1,
        # One decode slot, so a second request waits at decode while its KV cache sits in prefill.
        decode_args=["--max-batch", "1"],
        prefill_args=["--kv-ttl-seconds", "3"],
    )
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        yield stack


async def status(address: str, role: str) -> gen.WorkerStatus:
    stub_cls = gen_grpc.PrefillServiceStub if role == "prefill" else gen_grpc.DecodeServiceStub
    async with grpc.aio.insecure_channel(address) as channel:
        return await stub_cls(channel).Status(gen.StatusRequest(), timeout=5)


async def wait_for(predicate, what: str, timeout: float = 120.0):
    for _ in range(int(timeout / 0.1)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def router_ready(stack) -> bool:
    try:
        with urllib.request.urlopen(f"{stack.url}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def long_request(**extra):
    return {
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": LONG,
        "ignore_eos": True,
        "temperature": 0,
    } | extra


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not valid JSON"),
        ({"model": "gpt-4", "prompt": "hi"}, "does not exist"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -5}, "at least 1"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, "leaves room for"),
        ({"model": MODEL, "prompt": "word " * 1000}, f"context is {CONTEXT} tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, "between"),
        ({"model": MODEL, "prompt": [1, 2, 100000]}, "token ids"),
    ],
)
async def test_bad_requests_get_400_with_the_reason(stack, payload, reason):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.url}/v1/completions", data=data, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        body = await resp.json()
    assert resp.status == 400
    assert reason in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"


async def test_models_health_and_metrics_endpoints(stack):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stack.url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == [MODEL]
        async with session.get(f"{stack.url}/healthz") as resp:
            assert resp.status == 200
        await complete(
            session, f"{stack.url}/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}
        )
        async with session.get(f"{stack.url}/metrics") as resp:
            text = await resp.text()
    for name in (
        "distserve_requests_total",
        "distserve_request_prompt_tokens_bucket",
        "distserve_request_output_tokens_bucket",
        "distserve_ttft_seconds_bucket",
        "distserve_tpot_seconds_bucket",
        "distserve_queue_requests",
    ):
        assert name in text, name
    decode_metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{stack.proc('decode-0').http_port}/metrics"
    ).read()
    assert (
        b"distserve_kv_transfer_bytes_total" in decode_metrics
        and b"distserve_kv_transfer_seconds" in decode_metrics
    )


# --- dead workers ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_prefill_dies_while_a_kv_cache_waits_to_be_pulled(stack):
    prefill, decode = stack.prefill_addresses[0], stack.decode_addresses[0]
    async with aiohttp.ClientSession() as session:
        url = f"{stack.url}/v1/completions"
        first = asyncio.create_task(complete(session, url, long_request(stream=True), timeout=DEADLINE))
        await wait_for(lambda: _running(decode, 1), "the first request to run")
        second = asyncio.create_task(
            complete(session, url, {"model": MODEL, "prompt": "hello", "max_tokens": 5}, timeout=DEADLINE)
        )
        # The second's KV cache is now held by prefill, and decode has no slot to pull it into.
        await wait_for(lambda: _queued(decode, 1), "the second request to wait at decode")
        await asyncio.to_thread(stack.kill, "prefill-0")
        a, b = await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
        assert a.status == 200 and a.error is None and a.chunks == LONG  # already pulled: unaffected
        assert b.status == 503 and "pulling KV" in b.error["message"]
        assert (await status(decode, "decode")).kv_entries == 0
        await asyncio.to_thread(stack.restart, "prefill-0")
        await wait_for(lambda: router_ready(stack), "the router to see prefill again")
        again = await complete(
            session, url, {"model": MODEL, "prompt": "hello", "max_tokens": 5}, timeout=DEADLINE
        )
        assert again.status == 200 and len(again.body["choices"][0]["text"]) >= 0
    assert (await status(prefill, "prefill")).kv_entries == 0


@pytest.mark.slow
async def test_decode_dies_during_a_stream(stack):
    prefill, decode = stack.prefill_addresses[0], stack.decode_addresses[0]
    async with aiohttp.ClientSession() as session:
        url = f"{stack.url}/v1/completions"
        streaming = asyncio.create_task(complete(session, url, long_request(stream=True), timeout=DEADLINE))
        await wait_for(lambda: _running(decode, 1), "the stream to run")
        waiting = asyncio.create_task(complete(session, url, long_request(max_tokens=5), timeout=DEADLINE))
        await wait_for(lambda: _queued(decode, 1), "the second request to wait at decode")
        await asyncio.to_thread(stack.kill, "decode-0")
        a, b = await asyncio.wait_for(asyncio.gather(streaming, waiting), DEADLINE)
        assert a.status == 200 and a.error is not None and "decode instance" in a.error["message"]
        assert 0 < a.chunks < LONG
        assert b.status == 503 and "decode instance" in b.error["message"]
        # The waiting request's KV cache was never pulled: prefill frees it at its deadline (3 s here).
        await wait_for(lambda: _prefill_empty(prefill), "prefill to release the orphaned KV cache")
        await asyncio.to_thread(stack.restart, "decode-0")
        await wait_for(lambda: router_ready(stack), "the router to see decode again")
        again = await complete(
            session, url, {"model": MODEL, "prompt": "hello", "max_tokens": 5}, timeout=DEADLINE
        )
        assert again.status == 200 and again.error is None


async def _running(address: str, n: int) -> bool:
    try:
        return (await status(address, "decode")).running >= n
    except grpc.aio.AioRpcError:
        return False


async def _queued(address: str, n: int) -> bool:
    return (await status(address, "decode")).queued >= n


async def _prefill_empty(address: str) -> bool:
    s = await status(address, "prefill")
    return s.kv_entries == 0 and s.kv_used_bytes == 0
