"""What the router knows about its instances, from their Status answers: readiness, parallelism,
layer range and ranks. `GET /v1/distserve/instances` serves `instances_document`; `distserve up`
prints it (`local/topology.py`). No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_worker.router.picker import Instance, Rank, Stage


def apply_status(inst: Instance, status: gen.WorkerStatus) -> None:
    """Record a Status answer. A worker that reports no topology (`tp == 0`, an older version) is
    ready once it answers; one that does is ready only when it says so (all its ranks alive)."""
    inst.healthy, inst.error = True, ""
    inst.queued, inst.running = status.queued, status.running
    inst.free_slots, inst.max_context = status.free_slots, status.max_context
    inst.resident = status.kv_entries
    inst.kv_used_tokens, inst.kv_capacity_tokens = kv_tokens(status)
    inst.tp, inst.pp, inst.stage = status.tp, status.pp, status.stage
    if status.tp == 0:
        inst.ready = True
        inst.layers, inst.ranks = None, []
        return
    inst.ready = status.ready
    inst.layers = (status.layer_start, status.layer_end) if status.layer_end > status.layer_start else None
    inst.ranks = _ranks(status.ranks)
    inst.stages = [
        Stage(
            stage=st.stage,
            layers=(st.layer_start, st.layer_end),
            address=st.address,
            ready=st.ready,
            ranks=tuple(_ranks(st.ranks)),
        )
        for st in sorted(status.stages, key=lambda st: st.stage)
    ]
    if inst.stages and inst.stages[-1].layers[1] > 0:  # the instance holds every stage's layers
        inst.layers = (inst.stages[0].layers[0], inst.stages[-1].layers[1])
    if not inst.ready:
        down = [str(r.rank) for r in inst.ranks if not r.ready]
        if status.draining:
            inst.error = "not ready: draining (finishing what it holds, then exiting)"
        elif status.broken:
            inst.error = f"not ready: {status.broken}"
        else:
            inst.error = f"not ready (rank {', '.join(down)} down)" if down else "not ready"


def kv_tokens(status: gen.WorkerStatus) -> tuple[int, int]:
    """(used, capacity) of its KV room in tokens: capacity as rank 0 reports it (each rank holds
    its heads of every token), used scaled from the bytes; (0, 0) when it reports none."""
    ranks = sorted(status.ranks, key=lambda r: r.rank)
    capacity = ranks[0].kv_capacity_tokens if ranks else 0
    if not capacity or not status.kv_capacity_bytes:
        return 0, 0
    return status.kv_used_bytes * capacity // status.kv_capacity_bytes, capacity


def _ranks(ranks: Iterable[gen.RankInfo]) -> list[Rank]:
    return [
        Rank(
            rank=r.rank,
            device=r.device,
            parameters=r.parameters,
            kv_capacity_tokens=r.kv_capacity_tokens,
            kv_heads=(r.kv_head_start, r.kv_head_end),
            address=r.address,
            ready=r.ready,
        )
        for r in sorted(ranks, key=lambda r: r.rank)
    ]


def rank_json(rank: Rank) -> dict[str, Any]:
    return {
        "rank": rank.rank,
        "device": rank.device,
        "parameters": rank.parameters,
        "kv_capacity_tokens": rank.kv_capacity_tokens,
        "kv_heads": {"start": rank.kv_heads[0], "end": rank.kv_heads[1]},
        "address": rank.address,
        "ready": rank.ready,
    }


def instance_json(role: str, inst: Instance) -> dict[str, Any]:
    """One instance. Fields a worker did not report (an older worker: `tp` 0) are null."""
    known = inst.tp > 0
    return {
        "role": role,
        "address": inst.address,
        "ready": inst.routable,
        "reachable": inst.healthy,
        "error": inst.error,
        "tp": inst.tp if known else None,
        "pp": inst.pp if known else None,
        "stage": inst.stage if known else None,
        "layers": {"start": inst.layers[0], "end": inst.layers[1]} if inst.layers else None,
        "max_context": inst.max_context,
        "load": {
            "queued": inst.queued,
            "running": inst.running,
            "free_slots": inst.free_slots,
            "inflight": inst.inflight,
        },
        "ranks": [rank_json(r) for r in inst.ranks],
        # Pipeline stages (pp > 1): each stage's layers and ranks; their layers cover the model once.
        "stages": [
            {
                "stage": st.stage,
                "layers": {"start": st.layers[0], "end": st.layers[1]},
                "address": st.address,
                "ready": st.ready,
                "ranks": [rank_json(r) for r in st.ranks],
            }
            for st in inst.stages
        ],
    }


def instances_document(model: str, pools: Iterable[tuple[str, Iterable[Instance]]]) -> dict[str, Any]:
    """`GET /v1/distserve/instances`: every instance of every role (prefill first), by address."""
    listed = [
        instance_json(role, inst)
        for role, instances in pools
        for inst in sorted(instances, key=lambda i: i.address)
    ]
    return {
        "object": "list",
        "model": model,
        "ready": {
            role: sum(1 for i in listed if i["role"] == role and i["ready"]) for role in ("prefill", "decode")
        },
        "instances": listed,
    }
