"""Graceful drain in local mode (real processes, real gRPC, a tiny Llama): an instance that receives
SIGTERM, as a pod going away does, stops taking new work at once and finishes what it holds.

Twenty concurrent streams while one of two decode processes, or one of two prefill processes, is
sent SIGTERM mid-stream: none fails and none is cut short (each stream is the one-process greedy
reference, token for token), the process's readiness goes false at once and it exits by itself
once done. A router that has not polled since the signal has its calls refused, retries them on
the other instances and takes the draining ones out of rotation at once; a draining prefill keeps
serving the KV pulls of what it answered. At the drain deadline what is left fails with the reason
(none hangs) and the caches nobody pulled are released.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.runner import reference_greedy
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.model_source import ModelSpec
from distserve_worker.router.app import Router, build_app
from distserve_worker.router.picker import pick_decode, pick_prefill
from distserve_worker.settings import RouterSettings
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import (
    byte_tokenizer,
    greedy_body,
    save_tiny_model,
    tiny_model,
    tiny_prompts,
)

MODEL = "tiny"
CONTEXT = 4096
TOKENS = 300  # per stream: long enough that the signal lands mid-stream
PROMPTS = [p for p in tiny_prompts(seed=5)[:4] for _ in range(5)]  # 20 streams, 4 distinct prompts
DEADLINE = 120  # seconds any request or exit may take here (a loaded 2-core box) before we call it hung


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"), max_positions=CONTEXT)


@pytest.fixture(scope="module")
def reference():
    """Each distinct prompt's greedy tokens and their text, as one process produces them."""
    model = tiny_model("llama", max_positions=CONTEXT)
    out = {}
    for prompt in {tuple(p) for p in PROMPTS}:
        tokens = reference_greedy(model, list(prompt), TOKENS, eos=set())
        detok = Detokenizer(byte_tokenizer())
        out[prompt] = (tokens, "".join(detok.add(t) for t in tokens) + detok.flush())
    return out


@pytest.fixture(scope="module")
def started(tiny_path, tmp_path_factory):
    config = StackConfig(
        ModelSpec(name=MODEL, kind="Path", path=str(tiny_path)),
        prefill=2,
        decode=2,
        threads=1,
        # 8 decode slots for 20 streams: the rest wait at decode while prefill holds their caches.
        decode_args=["--max-batch", "4"],
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        yield stack


@pytest.fixture
def stack(started):
    """The stack with every process up and in the router's rotation (a test before drained some)."""
    for p in started.procs:
        # A worker a test before signalled (and, failing, did not wait for) may still be exiting:
        # let it go before deciding what to restart, or it goes away under the next test.
        if p.name.startswith(("prefill", "decode")) and p.alive() and readyz_or_gone(p.http_port) == 503:
            p.popen.wait(DEADLINE)
    dead = [p.name for p in started.procs if not p.alive()]
    if dead:
        started.restart(*dead, timeout=DEADLINE)
    asyncio.run(wait_for(lambda: router_sees_all(started), "the router to see every instance"))
    return started


# --- helpers -------------------------------------------------------------------------------------


async def wait_for(predicate, what: str, timeout: float = DEADLINE):
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def status(address: str, role: str) -> gen.WorkerStatus:
    stub_cls = gen_grpc.PrefillServiceStub if role == "prefill" else gen_grpc.DecodeServiceStub
    async with grpc.aio.insecure_channel(address) as channel:
        return await stub_cls(channel).Status(gen.StatusRequest(), timeout=5)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def readyz_or_gone(port: int) -> int | None:
    """/readyz status, or None once the process has exited (nothing listens)."""
    try:
        return readyz(port)
    except urllib.error.URLError:
        return None


async def router_sees_all(stack: LocalStack) -> bool:
    async with aiohttp.ClientSession() as session, session.get(f"{stack.url}/v1/distserve/instances") as r:
        ready = (await r.json())["ready"]
    return ready == {"prefill": 2, "decode": 2}


def stream_body(prompt: list[int], max_tokens: int = TOKENS) -> dict:
    return greedy_body(MODEL, prompt, max_tokens, stream=True, ignore_eos=True)


async def streams(session, stack: LocalStack, prompts: list[list[int]]) -> list[asyncio.Task]:
    url = f"{stack.url}/v1/completions"
    return [asyncio.create_task(complete(session, url, stream_body(p), timeout=DEADLINE)) for p in prompts]


def check_whole(results, prompts, reference) -> None:
    """0 failed, 0 truncated: every stream complete and equal to the greedy reference."""
    failed = [r.error or r.status for r in results if r.status != 200 or r.error]
    assert failed == []
    assert [r.chunks for r in results] == [TOKENS] * len(prompts)
    assert [r.body["choices"][0]["finish_reason"] for r in results] == ["length"] * len(prompts)
    assert [r.text for r in results] == [reference[tuple(p)][1] for p in prompts]


async def prefill(channel, rid: str, prompt: list[int]) -> gen.PrefillResponse:
    stub = gen_grpc.PrefillServiceStub(channel)
    request = gen.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=gen.SamplingParams())
    return await stub.Prefill(request, timeout=DEADLINE)


def decode(channel, answered: gen.PrefillResponse, max_tokens: int):
    """The token events of a Decode call for a prefill's answer (greedy, to max_tokens)."""
    request = gen.DecodeRequest(
        request_id=answered.request_id,
        kv_address=answered.kv_address,
        prompt_tokens=answered.prompt_tokens,
        first_token_id=answered.first_token_id,
        sampling=gen.SamplingParams(),
        max_tokens=max_tokens,
        ignore_eos=True,
    )
    return gen_grpc.DecodeServiceStub(channel).Decode(request, timeout=DEADLINE)


async def collect(call) -> tuple[int, grpc.aio.AioRpcError | None]:
    """(events received, the error that ended the call or None)."""
    received = 0
    try:
        async for _ in call:
            received += 1
    except grpc.aio.AioRpcError as exc:
        return received, exc
    return received, None


def refused(stack: LocalStack, name: str) -> int:
    """Requests the process refused while draining (its /metrics)."""
    url = f"http://127.0.0.1:{stack.proc(name).http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in lines
        if line.startswith("distserve_requests_total{") and 'status="draining"' in line
    )


async def exits_by_itself(stack: LocalStack, name: str) -> int:
    return await asyncio.to_thread(stack.proc(name).popen.wait, DEADLINE)


async def sigterm_mid_stream(stack: LocalStack, reference, role: str, holds) -> None:
    """20 streams, 14 sent before and 6 right after SIGTERM to the first instance of `role` seen
    holding work (`await holds(its status)`; which one the router favours is its business): all
    complete and correct; it turned not ready at once, then drained and exited by itself."""
    addresses = stack.prefill_addresses if role == "prefill" else stack.decode_addresses
    held: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        first = await streams(session, stack, PROMPTS[:14])

        async def holding() -> bool:
            for index, address in enumerate(addresses):
                if await holds(await status(address, role)):
                    held.append(index)
                    return True
            return False

        await wait_for(holding, f"a {role} instance to hold work")
        name, address = f"{role}-{held[0]}", addresses[held[0]]
        log = stack.proc(name).log
        mark = len(log.read_text())  # the log is appended to across restarts
        stack.terminate(name)
        later = await streams(session, stack, PROMPTS[14:])
        # Not ready at once (a fast drain may even be over, the process gone, by the time we look).
        port = stack.proc(name).http_port
        await wait_for(lambda: asyncio.to_thread(lambda: readyz_or_gone(port) in (503, None)), "503")
        try:
            draining = await status(address, role)
            assert draining.draining and not draining.ready
        except grpc.aio.AioRpcError:
            pass  # its server is closed: drained already, the process exiting (awaited below)
        results = await asyncio.gather(*first, *later)
        code = await exits_by_itself(stack, name)
    check_whole(results, PROMPTS, reference)
    assert code == 0
    said = log.read_text()[mark:]
    assert f"{role}: drain done" in said and "(drained)" in said  # all it held finished, none given up


# --- tests ---------------------------------------------------------------------------------------


async def test_sigterm_to_one_of_two_decodes_mid_stream_fails_and_truncates_nothing(stack, reference):
    async def running(s: gen.WorkerStatus) -> bool:
        return s.running >= 1

    await sigterm_mid_stream(stack, reference, "decode", running)


async def test_sigterm_to_one_of_two_prefills_mid_stream_fails_and_truncates_nothing(stack, reference):
    async def holds_caches_decode_has_no_room_for(s: gen.WorkerStatus) -> bool:
        if s.kv_entries < 1:
            return False
        decodes = [await status(a, "decode") for a in stack.decode_addresses]
        return all(d.free_slots == 0 for d in decodes)

    # Its caches wait for a decode slot to free: it must keep serving their pulls until then.
    await sigterm_mid_stream(stack, reference, "prefill", holds_caches_decode_has_no_room_for)


async def test_a_router_that_has_not_polled_since_the_signal_retries_elsewhere(stack, reference):
    """One prefill and one decode instance drain, each holding work: a router whose last poll saw
    them ready and idle picks them, is refused, serves the request on the others (token for token)
    and takes them out of rotation at once (a second request is not refused again). The draining
    prefill still serves the pull of the cache it answered for; both exit once done."""
    prompt = PROMPTS[0]
    tokens = reference[tuple(prompt)][0]
    settings = RouterSettings(
        model=ModelSpec(name=MODEL),
        prefill=tuple(stack.prefill_addresses),
        decode=tuple(stack.decode_addresses),
    )
    router = Router(settings, byte_tokenizer(), RuntimeMetrics("router", MODEL))
    await asyncio.gather(router.prefill.refresh(), router.decode.refresh())  # its last poll
    pv = pick_prefill(list(router.prefill.instances.values())).address  # what it picks next
    dv = pick_decode(list(router.decode.instances.values())).address
    po = next(a for a in stack.prefill_addresses if a != pv)
    do = next(a for a in stack.decode_addresses if a != dv)
    names = [f"prefill-{stack.prefill_addresses.index(pv)}", f"decode-{stack.decode_addresses.index(dv)}"]
    async with grpc.aio.insecure_channel(pv) as p_victim, grpc.aio.insecure_channel(po) as p_other:
        # What they hold when the signal comes: a cache answered, not pulled yet; a long stream.
        held = await prefill(p_victim, "held", prompt)
        long = await prefill(p_other, "long", prompt)
        async with grpc.aio.insecure_channel(dv) as d_victim:
            stream = aiter(decode(d_victim, long, 5 * TOKENS))
            first = await anext(stream)
            for name in names:
                stack.terminate(name)
            for name in names:
                await wait_for(
                    lambda name=name: asyncio.to_thread(lambda: readyz(stack.proc(name).http_port) == 503),
                    "503",
                )
            async with TestClient(TestServer(build_app(router))) as client:
                for _ in range(2):
                    r = await client.post(
                        "/v1/completions", json=greedy_body(MODEL, prompt, TOKENS, ignore_eos=True)
                    )
                    assert r.status == 200 and (await r.json())["choices"][0]["token_ids"] == tokens
                async with client.get("/v1/distserve/instances") as r:
                    listed = {i["address"]: i["ready"] for i in (await r.json())["instances"]}
            assert listed == {pv: False, dv: False, po: True, do: True}
            assert [refused(stack, name) for name in names] == [1, 1]  # once each, then out of rotation
            # The draining prefill serves the pull of the cache it answered for.
            async with grpc.aio.insecure_channel(do) as d_other:
                assert [e.token_id async for e in decode(d_other, held, TOKENS)] == tokens
            rest = [e.token_id async for e in stream]
    assert len([first, *rest]) == 5 * TOKENS  # the draining decode finished it
    assert [await exits_by_itself(stack, name) for name in names] == [0, 0]


async def test_at_the_drain_deadline_what_is_left_fails_with_the_reason_and_caches_are_released(started):
    """A decode process with a 1 s budget, four long streams running and a fifth waiting for a
    slot (its cache still at prefill): at the deadline each stream ends with an error naming the
    budget (none hangs), the waiting one's cache is released at once, and the process exits."""
    stack = started  # it needs prefill-0 and decode-1 only; the router is not involved
    proc = stack.proc("decode-1")
    original = list(proc.args)
    proc.args = [*original, "--drain-seconds", "1"]
    try:
        stack.restart("decode-1", *[] if stack.proc("prefill-0").alive() else ["prefill-0"], timeout=DEADLINE)
        prompt = PROMPTS[0]
        async with (
            grpc.aio.insecure_channel(stack.prefill_addresses[0]) as p0,
            grpc.aio.insecure_channel(stack.decode_addresses[1]) as d1,
        ):
            answered = [await prefill(p0, f"cut-{i}", prompt) for i in range(5)]
            calls = [asyncio.create_task(collect(decode(d1, a, CONTEXT - 100))) for a in answered]

            async def four_run_one_waits() -> bool:
                s = await status(stack.decode_addresses[1], "decode")
                return s.running == 4 and s.queued == 1

            await wait_for(four_run_one_waits, "four streams running and one waiting")
            assert (await status(stack.prefill_addresses[0], "prefill")).kv_entries == 1
            stack.terminate("decode-1")
            results = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
        assert all(e is not None and e.code() == grpc.StatusCode.UNAVAILABLE for _, e in results)
        assert all("--drain-seconds" in e.details() for _, e in results)
        counts = sorted(n for n, _ in results)
        assert counts[0] == 1 and all(1 < n < CONTEXT - 100 for n in counts[1:])  # cut mid-stream

        async def released() -> bool:
            return (await status(stack.prefill_addresses[0], "prefill")).kv_entries == 0

        await wait_for(released, "the waiting stream's cache to be released", timeout=10)  # TTL: 60 s
        assert await exits_by_itself(stack, "decode-1") == 0
    finally:
        proc.args = original
