"""What an instance reports about its ranks (`WorkerStatus.ranks`): device, shard size, KV room."""

from __future__ import annotations

from typing import Any

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_worker.engine.runner import KVLayout, ModelRunner
from distserve_worker.pp.chain import StageChain
from distserve_worker.settings import WorkerSettings
from distserve_worker.tp.group import RankGroup
from distserve_worker.tp.heads import rank_heads


def rank_infos(
    runner: ModelRunner, group: RankGroup | None, kv_heads: int, kv_capacity_tokens: int, address: str
) -> list[gen.RankInfo]:
    tp = 1 if group is None else group.world
    start, end = rank_heads(kv_heads, tp, 0)
    ok = group is None or group.broken is None
    out = [
        gen.RankInfo(
            rank=0,
            device=str(runner.device),
            parameters=runner.parameters,
            kv_capacity_tokens=kv_capacity_tokens,
            ready=ok,
            address=address,
            kv_head_start=start,
            kv_head_end=end,
        )
    ]
    if group is None:
        return out
    for rank, d in sorted(group.described.items()):
        alive = group.procs[rank].poll() is None
        out.append(
            gen.RankInfo(
                rank=rank,
                device=d.device,
                parameters=d.parameters,
                kv_capacity_tokens=d.kv_capacity_tokens,
                ready=ok and alive,
                address=d.address,
                kv_head_start=d.kv_head_start,
                kv_head_end=d.kv_head_end,
            )
        )
    return out


def broken_reason(group: RankGroup | None, chain: StageChain | None) -> str | None:
    """Why an instance cannot serve now: a dead rank, a broken stage chain; None when it can."""
    if group is not None and group.broken:
        return group.broken
    if chain is not None and chain.broken:
        return chain.broken
    return None


def topology(
    settings: WorkerSettings,
    layout: KVLayout,
    runner: ModelRunner,
    group: RankGroup | None,
    kv_heads: int,
    kv_capacity_tokens: int,
    chain: StageChain | None = None,
    draining: bool = False,
) -> dict[str, Any]:
    """The `WorkerStatus` fields saying what the instance runs (the contract) and whether it can
    (not while broken or draining): with pipeline stages, every stage and its layers, as stage 0
    last saw them."""
    s = settings
    layers = s.layers or (0, layout.num_layers)
    ranks = rank_infos(runner, group, kv_heads, kv_capacity_tokens, s.address)
    broken = broken_reason(group, chain)
    stages = []
    if chain is not None:
        own = gen.StageInfo(
            stage=s.stage,
            layer_start=layers[0],
            layer_end=layers[1],
            address=s.address,
            ready=group is None or group.broken is None,
            ranks=ranks,
        )
        stages = chain.stage_infos(own)
    return {
        "ready": broken is None and not draining,
        "broken": broken or "",
        "draining": draining,
        "tp": s.tp,
        "pp": s.pp,
        "stage": s.stage,
        "layer_start": layers[0],
        "layer_end": layers[1],
        "address": s.address,
        "ranks": ranks,
        "stages": stages,
    }
