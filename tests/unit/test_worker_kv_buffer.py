"""The prefill KV buffer: backpressure instead of drops, release after the pull, expiry."""

import asyncio

import pytest

from distserve_worker.kvtransfer.buffer import BufferTooSmall, KVBuffer


async def test_full_buffer_makes_callers_wait_until_a_release():
    buf = KVBuffer(capacity_bytes=100, ttl_seconds=60)
    await buf.reserve("a", 80)
    buf.store("a", "kv-a", 80)
    waiter = asyncio.create_task(buf.reserve("b", 50))
    await asyncio.sleep(0.05)
    assert not waiter.done() and buf.waiting == 1
    assert await buf.release("a")
    await asyncio.wait_for(waiter, 5)
    assert buf.used == 50 and buf.get("a") is None


async def test_a_caller_that_gives_up_leaves_nothing_behind():
    buf = KVBuffer(capacity_bytes=100, ttl_seconds=60)
    await buf.reserve("a", 100)
    waiter = asyncio.create_task(buf.reserve("b", 10))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert buf.waiting == 0 and set(buf.entries) == {"a"}


async def test_request_larger_than_the_buffer_is_refused_at_once():
    buf = KVBuffer(capacity_bytes=100, ttl_seconds=60)
    with pytest.raises(BufferTooSmall):
        await buf.reserve("a", 101)


async def test_unpulled_entries_expire_at_their_deadline():
    now = [0.0]
    buf = KVBuffer(capacity_bytes=100, ttl_seconds=10, clock=lambda: now[0])
    await buf.reserve("a", 10)
    buf.store("a", "kv", 10)
    assert await buf.expire() == []
    now[0] = 10.5
    assert await buf.expire() == ["a"]
    assert buf.used == 0
