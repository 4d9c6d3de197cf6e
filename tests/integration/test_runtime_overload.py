"""The router under overload, against the real stack (router, prefill and decode processes, tiny Llama).

Decode runs one sequence at a time (`--max-batch 1`), so it holds two requests (one running, one
waiting for the slot) before it is saturated; the router then queues at most 3 more. Beyond that a
request gets 503 with Retry-After at once; every request admitted completes; none fails with "no
decode instance is available", not even while the decode instance stops answering its polls.
"""

import asyncio
import contextlib
import os
import signal

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import save_tiny_model

pytestmark = pytest.mark.slow  # several processes

MODEL = "tiny-llama"
MAX_QUEUE = 3
DEADLINE = 240  # seconds any request or wait may take here (a loaded 2-core box) before we call it hung
# Blockers hold decode for the whole test: this many tokens take minutes at the tiny model's pace.
CONTEXT = 65536
ENDLESS = 60000
SHORT = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("llama"), max_positions=CONTEXT)
    config = StackConfig(
        ModelSpec(name=MODEL, kind="Path", path=str(path)),
        threads=1,
        decode_args=["--max-batch", "1"],
        router_args=["--max-queue", str(MAX_QUEUE), "--queue-timeout-seconds", str(DEADLINE)],
    )
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        yield stack


def body(max_tokens: int = SHORT, **extra):
    return {
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    } | extra


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of a router metric's samples that carry these labels."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def instances(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/v1/distserve/instances") as resp:
        return await resp.json()


async def wait_for(predicate, what: str) -> None:
    for _ in range(int(DEADLINE / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def stop(tasks) -> None:
    """Cancel client requests: their connections close, as when a user gives up."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_past_capacity_and_the_bound_requests_get_503_with_retry_after_and_the_rest_complete(stack):
    url, completions = stack.url, f"{stack.url}/v1/completions"
    async with aiohttp.ClientSession() as session:

        async def decode_line(n: int):
            async def reached() -> bool:
                depth = await metric(session, url, "distserve_router_queue_requests", role="decode")
                return depth == n

            return reached

        # Two endless requests fill decode: one runs, one waits there for the slot.
        blockers = [
            asyncio.create_task(complete(session, completions, body(ENDLESS, stream=True), timeout=DEADLINE))
            for _ in range(2)
        ]

        async def decode_full() -> bool:
            doc = await instances(session, url)
            return [i["load"]["inflight"] for i in doc["instances"] if i["role"] == "decode"] == [2]

        await wait_for(decode_full, "two requests on the decode instance")

        # A client that gives up while queued leaves the line.
        leaver = asyncio.create_task(complete(session, completions, body(), timeout=DEADLINE))
        await wait_for(await decode_line(1), "the request to wait for decode")
        await stop([leaver])
        await wait_for(await decode_line(0), "the line to be empty again")

        # The flood: more than decode's room (none left) plus the bound, streaming and not.
        flood = [
            asyncio.create_task(complete(session, completions, body(stream=i % 2 == 0), timeout=DEADLINE))
            for i in range(2 * MAX_QUEUE + 2)
        ]
        await wait_for(await decode_line(MAX_QUEUE), "the line to fill up")

        async def answered() -> bool:
            return sum(t.done() for t in flood) == len(flood) - MAX_QUEUE

        await wait_for(answered, "the requests past the bound to be turned away")  # while decode is full
        # Saturated, not gone: the decode instance is ready all along.
        assert (await instances(session, url))["ready"]["decode"] == 1
        await stop(blockers)
        results = await asyncio.wait_for(asyncio.gather(*flood), DEADLINE)

        done = [(i, r) for i, r in enumerate(results) if r.status == 200]
        turned_away = [r for r in results if r.status == 503]
        assert len(done) == MAX_QUEUE and len(turned_away) == len(flood) - MAX_QUEUE
        for i, r in done:  # in full, streamed (even ones) or not
            assert r.error is None and r.body["usage"]["completion_tokens"] == SHORT
            assert r.chunks == (SHORT if i % 2 == 0 else 0)
        for r in turned_away:
            assert r.error["code"] == "queue_full" and r.error["type"] == "server_error"
            assert "no decode instance has room" in r.error["message"]
            assert f"queues at most {MAX_QUEUE}" in r.error["message"]
            assert int(r.headers["Retry-After"]) >= 1
        assert not any("is available" in (r.error or {}).get("message", "") for r in results)

        assert await metric(session, url, "distserve_router_queue_requests", role="decode") == 0
        # The leaver and the admitted three waited; the rest never joined the line.
        waits = await metric(session, url, "distserve_router_queue_wait_seconds_count", role="decode")
        assert waits >= MAX_QUEUE + 1
        assert await metric(session, url, "distserve_requests_total", status="overloaded") == len(turned_away)


async def test_a_decode_instance_that_stops_answering_polls_makes_requests_wait_not_fail(stack):
    """What a load average of 9 did: the Status poll timed out, the router counted the decode
    instance out and failed requests at once. Now they wait for it and complete."""
    url, completions = stack.url, f"{stack.url}/v1/completions"
    decode = stack.proc("decode-0").popen
    async with aiohttp.ClientSession() as session:
        os.kill(decode.pid, signal.SIGSTOP)
        try:

            async def decode_out() -> bool:
                return (await instances(session, url))["ready"]["decode"] == 0

            await wait_for(decode_out, "the router to count decode out")
            waiting = [
                asyncio.create_task(complete(session, completions, body(stream=s), timeout=DEADLINE))
                for s in (True, False)
            ]

            async def both_wait() -> bool:
                return await metric(session, url, "distserve_router_queue_requests", role="decode") == 2

            await wait_for(both_wait, "both requests to wait for decode")
        finally:
            os.kill(decode.pid, signal.SIGCONT)
        streamed, collected = await asyncio.wait_for(asyncio.gather(*waiting), DEADLINE)
    assert streamed.status == 200 and streamed.error is None and streamed.chunks == SHORT
    assert collected.status == 200 and collected.body["usage"]["completion_tokens"] == SHORT


@pytest.fixture(autouse=True)
def _never_leave_decode_stopped(stack):
    yield
    with contextlib.suppress(ProcessLookupError):
        os.kill(stack.proc("decode-0").popen.pid, signal.SIGCONT)
