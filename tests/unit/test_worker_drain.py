"""The drain state machine (drain.py) on a manual clock, and the refusal a router retries on, over
real gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from distserve_worker.drain import Drain, refuse, refused_draining


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Work:
    """Holds `held` requests; giving up drops them all."""

    def __init__(self, held: int) -> None:
        self.held = held
        self.reasons: list[str] = []

    def idle(self) -> bool:
        return self.held == 0

    async def give_up(self, reason: str) -> int:
        self.reasons.append(reason)
        given_up, self.held = self.held, 0
        return given_up


async def until(predicate) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("never happened")


def test_sigterm_before_serving_or_twice_or_without_a_budget_stops_at_once():
    drain = Drain(30)
    assert not drain.start()  # still loading: nothing to drain
    drain.serving = True
    assert drain.start() and drain.draining
    assert not drain.start()  # a second SIGTERM
    no_budget = Drain(0)
    no_budget.serving = True
    assert not no_budget.start() and not no_budget.draining


async def test_an_idle_process_is_done_at_once_and_a_busy_one_when_its_work_ends():
    idle = Drain(30)
    running = asyncio.ensure_future(idle.run(Work(0)))
    await until(lambda: idle.serving)
    idle.start()
    assert await asyncio.wait_for(running, 5) == "drained"

    busy, work, told = Drain(30), Work(3), []
    busy.on_start.append(lambda: told.append("draining"))
    running = asyncio.ensure_future(busy.run(work))
    await until(lambda: busy.serving)
    busy.start()
    await asyncio.sleep(0.01)
    assert not running.done() and told == ["draining"]  # still holds its work
    work.held = 0
    busy.changed()
    assert await asyncio.wait_for(running, 5) == "drained" and work.reasons == []


async def test_at_the_deadline_what_is_left_is_given_up_with_the_budget_named():
    clock, work = Clock(), Work(2)
    drain = Drain(30, clock)
    running = asyncio.ensure_future(drain.run(work, extra=2.0))
    await until(lambda: drain.serving)
    drain.start()
    clock.now += 31  # past the budget, not past the budget plus the extra
    drain.changed()
    await asyncio.sleep(0.01)
    assert not running.done()
    clock.now += 2
    drain.changed()
    assert await asyncio.wait_for(running, 5) == "budget ran out: gave up 2"
    assert work.held == 0 and "--drain-seconds" in work.reasons[0] and "30 s" in work.reasons[0]


@pytest.fixture
async def refusing_server():
    """A gRPC server whose one method refuses as a draining worker does (and another that fails
    otherwise)."""

    async def drained(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await refuse(context, "decode instance 127.0.0.1:1")

    async def broken(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "a rank died")

    handler = grpc.method_handlers_generic_handler(
        "test.Drain",
        {
            "Drained": grpc.unary_unary_rpc_method_handler(drained),
            "Broken": grpc.unary_unary_rpc_method_handler(broken),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_a_refusal_while_draining_is_told_apart_from_a_failure(refusing_server):
    async with grpc.aio.insecure_channel(refusing_server) as channel:
        errors = []
        for method in ("Drained", "Broken"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/test.Drain/{method}")(b"", timeout=5)
            errors.append(err.value)
    refused, failed = errors
    assert refused.code() == failed.code() == grpc.StatusCode.UNAVAILABLE
    assert refused_draining(refused) and not refused_draining(failed)
    assert "is draining" in refused.details() and "another instance" in refused.details()


async def test_a_worker_cannot_share_a_port_another_server_holds() -> None:
    """gRPC's default SO_REUSEPORT would let a second server start on a taken port and split the
    connections between the two; a worker's server refuses, naming the flag."""
    from distserve_worker.serving import bind, new_server

    first = grpc.aio.server()  # gRPC's defaults, as every worker's server had them
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        shared = grpc.aio.server()
        assert shared.add_insecure_port(f"127.0.0.1:{port}") == port  # what happened to a router
        await shared.stop(None)
        with pytest.raises(SystemExit, match=rf"127.0.0.1:{port} \(--port\)"):
            bind(new_server(), f"127.0.0.1:{port}")
    finally:
        await first.stop(None)
