"""What the router knows about its instances (`GET /v1/distserve/instances`), from Status answers:
readiness (an older worker without topology counts as ready; a tensor-parallel one only when it
says so), parallelism, layer range and ranks; and what it passes on from prefill to decode."""

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.local.topology import format_topology, topology_rows
from distserve_worker.model_source import ModelSpec
from distserve_worker.router.app import Unavailable, build_app
from distserve_worker.router.discovery import StaticDiscovery
from distserve_worker.router.openai import parse_request
from distserve_worker.router.picker import Instance, pick_prefill
from distserve_worker.router.topology import apply_status, instance_json, instances_document
from distserve_worker.settings import RouterSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support
from operator_support import fake_workers


def tp2_status(ready=True, dead_rank=None, role="prefill"):
    return gen.WorkerStatus(
        role=role,
        model="m",
        queued=1,
        running=2,
        free_slots=3,
        max_context=512,
        ready=ready,
        tp=2,
        pp=1,
        stage=0,
        layer_start=0,
        layer_end=30,
        address="10.0.0.1:50051",
        ranks=[
            gen.RankInfo(
                rank=r,
                device=f"cuda:{r}",
                parameters=44_900_000,
                kv_capacity_tokens=65536,
                ready=r != dead_rank,
                address=f"10.0.0.1:{51052 + r}",
                kv_head_start=r,
                kv_head_end=r + 1,
            )
            for r in (1, 0)  # out of order on purpose: listed by rank
        ],
    )


def test_a_worker_without_topology_is_ready_once_it_answers():
    inst = Instance("a:1")
    assert not inst.routable  # never polled
    apply_status(inst, gen.WorkerStatus(role="prefill", queued=2, max_context=256))  # tp 0, ready false
    assert inst.routable and inst.queued == 2 and inst.max_context == 256
    doc = instance_json("prefill", inst)
    assert doc["ready"] and doc["reachable"]
    assert (doc["tp"], doc["pp"], doc["stage"], doc["layers"], doc["ranks"]) == (None, None, None, None, [])


def test_a_tensor_parallel_instance_lists_its_ranks():
    inst = Instance("10.0.0.1:50051")
    apply_status(inst, tp2_status())
    assert inst.routable
    doc = instance_json("prefill", inst)
    assert doc == {
        "role": "prefill",
        "address": "10.0.0.1:50051",
        "ready": True,
        "reachable": True,
        "error": "",
        "tp": 2,
        "pp": 1,
        "stage": 0,
        "layers": {"start": 0, "end": 30},
        "max_context": 512,
        "load": {"queued": 1, "running": 2, "free_slots": 3, "inflight": 0},
        "ranks": [
            {
                "rank": r,
                "device": f"cuda:{r}",
                "parameters": 44_900_000,
                "kv_capacity_tokens": 65536,
                "kv_heads": {"start": r, "end": r + 1},
                "address": f"10.0.0.1:{51052 + r}",
                "ready": True,
            }
            for r in (0, 1)
        ],
        "stages": [],
    }


def pp2_status(ready: bool = True, broken: str = "") -> gen.WorkerStatus:
    def stage(s: int, start: int, end: int) -> gen.StageInfo:
        rank = gen.RankInfo(rank=0, device="cpu", ready=ready, address=f"10.0.0.{s + 1}:50051")
        return gen.StageInfo(
            stage=s, layer_start=start, layer_end=end, address=rank.address, ready=ready, ranks=[rank]
        )

    return gen.WorkerStatus(
        role="decode",
        ready=ready,
        broken=broken,
        tp=1,
        pp=2,
        stage=0,
        layer_start=0,
        layer_end=19,
        address="10.0.0.1:50051",
        ranks=[gen.RankInfo(rank=0, device="cpu", ready=True, address="10.0.0.1:50051")],
        stages=[stage(1, 19, 30), stage(0, 0, 19)],  # out of order on purpose: listed by stage
    )


def test_a_pipelined_instance_lists_its_stages_covering_the_model_once():
    inst = Instance("10.0.0.1:50051")
    apply_status(inst, pp2_status())
    doc = instance_json("decode", inst)
    assert doc["ready"] and doc["pp"] == 2 and doc["layers"] == {"start": 0, "end": 30}
    assert [(s["stage"], s["layers"]["start"], s["layers"]["end"]) for s in doc["stages"]] == [
        (0, 0, 19),
        (1, 19, 30),
    ]
    assert [s["ranks"][0]["address"] for s in doc["stages"]] == ["10.0.0.1:50051", "10.0.0.2:50051"]


def test_a_broken_stage_chain_takes_its_instance_out_with_the_reason():
    inst = Instance("10.0.0.1:50051")
    apply_status(inst, pp2_status(ready=False, broken="pipeline stage 1 at 10.0.0.2:50051 is unreachable"))
    assert not inst.routable and inst.error == "not ready: pipeline stage 1 at 10.0.0.2:50051 is unreachable"


def test_a_dead_rank_takes_its_instance_out_of_rotation_and_back_when_it_recovers():
    broken, fine = Instance("a:1"), Instance("b:1")
    apply_status(broken, tp2_status(ready=False, dead_rank=1))
    apply_status(fine, tp2_status())
    fine.queued = 50  # busier, but the only one that can serve
    assert not broken.routable and "rank 1" in broken.error
    assert pick_prefill([broken, fine]) is fine
    doc = instance_json("prefill", broken)
    assert not doc["ready"] and doc["reachable"] and [r["ready"] for r in doc["ranks"]] == [True, False]
    apply_status(broken, tp2_status())
    assert broken.routable and broken.error == "" and pick_prefill([broken, fine]) is broken


def test_the_document_lists_every_instance_of_both_roles():
    p1, p0, d0 = Instance("p:2"), Instance("p:1"), Instance("d:1")
    apply_status(p1, tp2_status())
    apply_status(p0, gen.WorkerStatus(role="prefill"))
    d0.error = "UNAVAILABLE: connection refused"  # never answered
    doc = instances_document("m", [("prefill", [p1, p0]), ("decode", [d0])])
    assert doc["model"] == "m"
    assert [(i["role"], i["address"], i["ready"]) for i in doc["instances"]] == [
        ("prefill", "p:1", True),
        ("prefill", "p:2", True),
        ("decode", "d:1", False),
    ]
    assert doc["ready"] == {"prefill": 2, "decode": 0}
    table = format_topology(doc)
    assert "unreachable" in table and "UNAVAILABLE: connection refused" in table
    rows = topology_rows(doc)
    assert len(rows) == 4  # p:1 (no ranks), p:2 rank 0 and rank 1, d:1
    assert rows[1][:6] == ("p:2", "prefill", "ready", "0", "[0, 30)", "2")
    assert rows[1][6:] == ("0", "cuda:0", "44.9M", "65,536", "[0, 1)", "yes")
    assert rows[2][:6] == ("",) * 6 and rows[2][6] == "1"


class TP2Prefill(fake_workers.FakePrefill):
    """A prefill instance of two tensor-parallel ranks (its answers name both)."""

    def __init__(self):
        self.status = tp2_status()

    async def Status(self, request, context):
        return self.status

    async def Prefill(self, request, context):
        response = await super().Prefill(request, context)
        response.kv_rank_addresses.extend(["127.0.0.1:1", "127.0.0.1:2"])
        return response


class FakeDecode(gen_grpc.DecodeServiceServicer):
    def __init__(self):
        self.requests = []

    async def Status(self, request, context):
        return gen.WorkerStatus(role="decode", free_slots=4, max_context=512)  # an older worker: tp 0

    async def Decode(self, request, context):
        self.requests.append(request)
        yield gen.TokenEvent(
            request_id=request.request_id, token_id=request.first_token_id, index=0, finish_reason=1
        )


@pytest.fixture
async def fake_router():
    prefill, decode = TP2Prefill(), FakeDecode()
    async with fake_workers.serving(prefill, decode) as address:
        # A request finding no ready instance waits this long for one before its 503.
        settings = RouterSettings(
            model=ModelSpec(name="m"), prefill=(address,), decode=(address,), queue_timeout_seconds=0.2
        )
        async with fake_workers.router_for(settings) as router:
            yield router, prefill, decode, address


async def test_the_endpoint_serves_what_the_status_polls_said(fake_router):
    router, _, _, address = fake_router
    async with TestClient(TestServer(build_app(router))) as client:
        response = await client.get("/v1/distserve/instances")
        assert response.status == 200
        doc = await response.json()
    assert [(i["role"], i["address"], i["ready"], i["tp"]) for i in doc["instances"]] == [
        ("prefill", address, True, 2),
        ("decode", address, True, None),
    ]
    assert doc["instances"][0]["layers"] == {"start": 0, "end": 30}
    assert [r["device"] for r in doc["instances"][0]["ranks"]] == ["cuda:0", "cuda:1"]


async def test_rank_addresses_reach_decode_and_a_not_ready_instance_gets_no_requests(fake_router):
    router, prefill, decode, _ = fake_router
    req = parse_request({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}, False, "m")
    events = [e async for e in router.generate(req, [1, 2, 3], 2)]
    assert [e.token_id for e in events] == [7]
    assert list(decode.requests[0].kv_rank_addresses) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert decode.requests[0].kv_address == "127.0.0.1:1"

    prefill.status = tp2_status(ready=False, dead_rank=1)
    await router.prefill.refresh()
    assert not router.ready()
    with pytest.raises(Unavailable, match="no prefill instance could take this request"):
        [e async for e in router.generate(req, [1, 2, 3], 2)]
    assert len(decode.requests) == 1


def test_the_table_lists_each_stage_with_its_layers_and_ranks():
    inst = Instance("10.0.0.1:50051")
    apply_status(inst, pp2_status())
    rows = topology_rows({"instances": [instance_json("decode", inst)]})
    # instance role state stage layers tp | rank device params KV-tokens KV-heads ready
    assert [row[:6] for row in rows] == [
        ("10.0.0.1:50051", "decode", "ready", "0", "[0, 19)", "1"),
        ("", "", "", "1", "[19, 30)", "1"),
    ]
    assert [row[-1] for row in rows] == ["yes", "yes"]


def test_a_draining_instance_is_out_of_rotation_saying_so():
    inst = Instance("a:1")
    status = tp2_status(ready=False)
    status.draining = True
    apply_status(inst, status)
    assert not inst.routable and inst.error.startswith("not ready: draining")


class HeldDecode(gen_grpc.DecodeServiceServicer):
    """A decode instance whose streams end when the test says so."""

    def __init__(self):
        self.release = asyncio.Event()

    async def Status(self, request, context):
        return gen.WorkerStatus(role="decode", free_slots=4, max_context=512)

    async def Decode(self, request, context):
        yield gen.TokenEvent(request_id=request.request_id, token_id=request.first_token_id, index=0)
        await self.release.wait()
        yield gen.TokenEvent(request_id=request.request_id, token_id=8, index=1, finish_reason=2)


async def test_an_instance_gone_from_dns_keeps_the_streams_this_router_has_on_it():
    """A draining pod leaves its headless Service's DNS records once not ready, while it finishes
    the streams it holds: the router drops it only after the last of its own streams on it ended,
    instead of closing the channel under them."""
    decode = HeldDecode()
    async with fake_workers.serving(TP2Prefill(), decode) as address:
        settings = RouterSettings(model=ModelSpec(name="m"), prefill=(address,), decode=(address,))
        async with fake_workers.router_for(settings) as router:
            req = parse_request({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}, False, "m")
            events = router.generate(req, [1, 2, 3], 2)
            first = await anext(events)
            router.decode.discovery = StaticDiscovery(())  # its DNS record is gone
            await router.decode.refresh()
            assert not router.decode.instances[address].routable  # no new requests, streams go on
            decode.release.set()
            assert [first.token_id, *[e.token_id async for e in events]] == [7, 8]
            await router.decode.refresh()
            assert router.decode.instances == {}
