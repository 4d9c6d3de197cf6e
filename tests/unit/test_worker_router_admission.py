"""The router under overload, without I/O: when an instance is saturated (picker.py) and the bounded
FIFO line requests wait in for one (admission.py)."""

import asyncio

import pytest

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_worker.router.admission import Admission, QueueTimeout
from distserve_worker.router.picker import (
    Instance,
    decode_room,
    decode_saturated,
    pick_decode,
    pick_prefill,
    prefill_saturated,
)
from distserve_worker.router.topology import apply_status

# --- the line ------------------------------------------------------------------------------------


class Capacity:
    """Free instances handed out one at a time, as a picker would, and the order they went in."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.order: list[str] = []

    def grant(self, who: str):
        def take():
            if self.free == 0:
                return None
            self.free -= 1
            self.order.append(who)
            return who

        return take


async def settle() -> None:
    """Let every ready task run until it blocks again (the line wakes its waiters by events)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_request_with_room_takes_it_at_once_and_never_waits():
    depths = []
    line: Admission[str] = Admission("decode", bound=2, timeout_seconds=60, on_depth=depths.append)
    capacity = Capacity(free=1)
    assert await line.take(capacity.grant("a")) == "a"
    assert line.depth == 0 and depths == []


async def test_waiters_are_served_in_arrival_order_as_capacity_frees():
    depths = []
    line: Admission[str] = Admission("decode", bound=10, timeout_seconds=60, on_depth=depths.append)
    capacity = Capacity()
    tasks = [asyncio.create_task(line.take(capacity.grant(w))) for w in "abcd"]
    await settle()
    assert line.depth == 4 and capacity.order == []
    capacity.free = 1  # one slot frees: only the head gets it, not whoever asks first
    line.notify()
    await settle()
    assert capacity.order == ["a"] and line.depth == 3
    capacity.free = 3  # several free at once: the head takes one and wakes the next, and so on
    line.notify()
    assert await asyncio.gather(*tasks) == ["a", "b", "c", "d"]
    assert capacity.order == ["a", "b", "c", "d"] and line.depth == 0
    assert max(depths) == 4 and depths[-1] == 0


async def test_a_late_arrival_does_not_overtake_the_line_even_when_room_appears():
    line: Admission[str] = Admission("prefill", bound=10, timeout_seconds=60)
    capacity = Capacity()
    first = asyncio.create_task(line.take(capacity.grant("first")))
    await settle()
    capacity.free = 1  # room, but nobody has told the line yet
    late = asyncio.create_task(line.take(capacity.grant("late")))
    await settle()
    assert capacity.order == [] and line.depth == 2  # the late one queued behind the head
    line.notify()
    assert await first == "first"
    capacity.free = 1
    line.notify()
    assert await late == "late" and capacity.order == ["first", "late"]


async def test_the_bound_counts_waiters_those_on_their_way_and_free_room():
    line: Admission[str] = Admission("decode", bound=2, timeout_seconds=60)
    assert line.admits()
    waiting = [asyncio.create_task(line.take(lambda: None)) for _ in range(2)]
    await settle()
    assert not line.admits()  # two wait: the bound is reached
    assert line.admits(ahead=3, room=4)  # 2 + 3 on their way - 4 free = 1 would wait ahead of it
    assert not line.admits(ahead=4, room=4)
    assert Admission("decode", bound=0, timeout_seconds=1).admits(room=1)  # bound 0: only with room
    assert not Admission("decode", bound=0, timeout_seconds=1).admits()
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_waiter_times_out_with_the_reason_and_the_next_one_moves_up():
    line: Admission[str] = Admission("decode", bound=10, timeout_seconds=0.05)
    capacity = Capacity()
    with pytest.raises(QueueTimeout, match=r"no decode instance could take this request within 0\.05 s"):
        await line.take(capacity.grant("a"))
    assert line.depth == 0
    capacity.free = 1
    assert await line.take(capacity.grant("b")) == "b"


async def test_a_cancelled_waiter_leaves_the_line_and_wakes_the_one_behind():
    line: Admission[str] = Admission("prefill", bound=10, timeout_seconds=60)
    capacity = Capacity()
    head = asyncio.create_task(line.take(capacity.grant("gone")))
    behind = asyncio.create_task(line.take(capacity.grant("stays")))
    await settle()
    capacity.free = 1  # room appears just as the head's client goes away
    head.cancel()
    assert await behind == "stays"  # no notify needed: the leaver woke the new head
    assert head.cancelled() and capacity.order == ["stays"] and line.depth == 0


# --- saturation ------------------------------------------------------------------------------------


def decode(address="d:1", slots=2, running=0, queued=0, inflight=0, polled=0, kv=0, kv_inflight=0):
    """A decode instance as its last poll described it (`slots` = free + admitted) plus this
    router's own requests on it now (`inflight`) and at that poll (`polled`)."""
    admitted = min(running + queued, slots)
    return Instance(
        address,
        healthy=True,
        queued=queued,
        running=running,
        free_slots=slots - admitted,
        resident=admitted,
        inflight=inflight,
        polled_inflight=polled,
        kv_capacity_tokens=kv,
        inflight_tokens=kv_inflight,
    )


def test_a_decode_instance_holds_its_batch_and_as_many_again_waiting_before_it_is_saturated():
    assert not decode_saturated(decode(slots=2, inflight=3))
    assert decode_saturated(decode(slots=2, inflight=4))
    # Other routers' requests count: it reported 4 at the last poll, none of them this router's.
    assert decode_saturated(decode(slots=2, running=2, queued=2))
    # This router's own: it reported 4, all this router's then; 3 have finished since.
    assert not decode_saturated(decode(slots=2, running=2, queued=2, polled=4, inflight=1))
    assert not decode_saturated(decode(slots=0, inflight=99))  # no slots reported: it queues itself


def test_a_decode_instance_is_saturated_by_the_kv_tokens_this_router_reserved_there():
    assert not decode_saturated(decode(slots=64, kv=1000, inflight=1, kv_inflight=1500), need=500)
    assert decode_saturated(decode(slots=64, kv=1000, inflight=1, kv_inflight=1600), need=500)
    # A request that could never fit is not held back: the instance refuses it with the reason.
    assert not decode_saturated(decode(slots=64, kv=1000, inflight=1, kv_inflight=1900), need=1001)


def test_a_prefill_instance_is_saturated_when_its_kv_buffer_has_no_room_for_the_prompt():
    def prefill(used, inflight_tokens=0):
        return Instance(
            "p:1", healthy=True, kv_capacity_tokens=1000, kv_used_tokens=used, inflight_tokens=inflight_tokens
        )

    assert not prefill_saturated(prefill(used=800), need=200)
    assert prefill_saturated(prefill(used=800), need=201)  # caches waiting for decode fill it
    assert prefill_saturated(prefill(used=500, inflight_tokens=400), need=101)  # and prompts in flight
    assert not prefill_saturated(prefill(used=0), need=5000)  # never fits: the instance says why
    assert not prefill_saturated(Instance("p:2", healthy=True), need=10)  # no buffer reported


def test_picks_skip_saturated_instances_and_give_none_when_all_are():
    busy, free = decode("d:1", slots=1, inflight=2), decode("d:2", slots=1, inflight=1)
    assert pick_decode([busy, free]) is free
    free.inflight = 2
    assert pick_decode([busy, free]) is None  # the request waits in the router's line
    full = Instance("p:1", healthy=True, kv_capacity_tokens=10, kv_used_tokens=10)
    roomy = Instance("p:2", healthy=True, kv_capacity_tokens=10, queued=5)
    assert pick_prefill([full, roomy], need=1) is roomy
    assert pick_prefill([full], need=1) is None


def test_decode_prefers_an_instance_with_a_free_slot_over_one_with_waiting_room():
    waiting_room = decode("d:1", slots=4, inflight=5)  # a full batch, room for 3 more to wait
    slot = decode("d:2", slots=8, running=8, queued=0, polled=0, inflight=0)
    slot.free_slots, slot.resident, slot.running = 1, 7, 7  # one slot free, 7 others' running
    assert pick_decode([waiting_room, slot]) is slot  # more loaded, but it runs the request at once


def test_decode_room_is_what_ready_instances_can_take_before_all_are_saturated():
    down = decode("d:3", slots=8)
    down.healthy = False
    assert decode_room([decode("d:1", slots=2, inflight=1), decode("d:2", slots=1), down]) == 3 + 2
    assert decode_room([decode("d:1", slots=2, inflight=9)]) == 0


def test_a_poll_gives_the_batch_slots_and_kv_room_that_saturation_reads():
    inst = Instance("d:1")
    apply_status(
        inst,
        gen.WorkerStatus(
            role="decode",
            running=3,
            queued=2,
            free_slots=0,
            kv_entries=4,  # admitted: 3 running, 1 pulling its cache
            kv_capacity_bytes=4000,
            kv_used_bytes=1000,
            tp=1,
            ready=True,
            ranks=[gen.RankInfo(rank=0, kv_capacity_tokens=1000, ready=True)],
        ),
    )
    assert (inst.free_slots + inst.resident, inst.kv_used_tokens, inst.kv_capacity_tokens) == (4, 250, 1000)
    assert not decode_saturated(inst) and inst.load == 5
    inst.inflight = 3  # this router's, sent since the poll: 8 held by a 4-slot instance
    assert decode_saturated(inst)
