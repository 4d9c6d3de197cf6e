"""Brute force over the planner's placement space, for the tests and benchmarks that hold the
search to it: every deployment enumerated and scored with the same per-instance rates."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from distserve_operator import api
from distserve_planner import PlanInput, WorkloadModel, core
from distserve_planner.architecture import CATALOGUE
from distserve_planner.hardware import BUILTIN, Links
from distserve_planner.latency import analytical
from distserve_planner.placement import Placement
from distserve_planner.search import (
    ClusterShape,
    Context,
    SloTargets,
    decode_rate,
    nests,
    pipeline_bandwidth,
    prefill_rate,
    shardable_tps,
)
from distserve_planner.workload import Lengths


def case_input(
    model: str, gpus_per_node: int, nodes: int, rate: float, ttft: float, tpot: float, **kw: Any
) -> PlanInput:
    arch = CATALOGUE[model]
    device = BUILTIN[api.GpuType.A100_80GB]
    links = Links(300e9, kw.pop("inter", 25e9))
    fields: dict[str, Any] = dict(
        architecture=arch,
        device=device,
        links=links,
        latency=analytical(arch, device, links.intra_node),
        slo=SloTargets(ttft_ms=ttft, tpot_ms=tpot, attainment=0.9),
        workload=WorkloadModel(rate=rate, inputs=Lengths(kw.pop("inputs", 512)), outputs=Lengths(128)),
        cluster=ClusterShape(gpus_per_node, nodes, kw.pop("budget", gpus_per_node * nodes)),
        affinity=api.Affinity.HIGH,
        n_requests=150,
    )
    fields.update(kw)
    return PlanInput(**fields)


def context(inp: PlanInput) -> Context:
    """The search's own context (requests and engine limits): brute force differs in the search only."""
    return core.context(inp)


def brute_high(ctx: Context, shape: ClusterShape, rate: float) -> Iterator[Placement]:
    """Every prefill and decode (TP, PP) and every replica count within the budget."""
    links, g = ctx.links, shape.gpus_per_node
    transfer = links.intra_node if shape.budget <= g else links.inter_node
    tps = shardable_tps(ctx, g)
    shapes = [
        (t, p)
        for t in tps
        for p in range(1, shape.budget + 1)
        if ctx.arch.layers % p == 0 and t * p <= shape.budget
    ]
    for (ptp, ppp), (dtp, dpp) in itertools.product(shapes, shapes):
        bp = pipeline_bandwidth(links, ppp, -(-ppp // (g // ptp)))
        bd = pipeline_bandwidth(links, dpp, -(-dpp // (g // dtp)))
        p, d = prefill_rate(ctx, ptp, ppp, bp), decode_rate(ctx, dtp, dpp, bd, transfer, dtp * dpp)
        if p.max_rate <= 0 or d.max_rate <= 0:
            continue
        for n in range(1, shape.budget // p.gpus + 1):
            for m in range(1, (shape.budget - n * p.gpus) // d.gpus + 1):
                yield Placement(p, d, n, m, 1, "High", transfer)


def brute_low(ctx: Context, shape: ClusterShape, rate: float) -> Iterator[Placement]:
    """Every span, every pair of node segments (TP, intra-node depth), every mix of them on a node
    and every number of node groups."""
    links, g, layers = ctx.links, shape.gpus_per_node, ctx.arch.layers
    tps = shardable_tps(ctx, g)
    for span in range(1, shape.nodes + 1):
        if layers % span:
            continue
        segs = [
            (t, k)
            for t in tps
            for k in range(1, g // t + 1)
            if layers % (span * k) == 0 and nests(ctx.arch, ctx.requests, span * k, span)
        ]
        for (ptp, pk), (dtp, dk) in itertools.product(segs, segs):
            pp_, dp_ = span * pk, span * dk
            p = prefill_rate(ctx, ptp, pp_, pipeline_bandwidth(links, pp_, span), span)
            d = decode_rate(
                ctx, dtp, dp_, pipeline_bandwidth(links, dp_, span), links.intra_node, dtp * dp_, span
            )
            if p.max_rate <= 0 or d.max_rate <= 0:
                continue
            for a in range(1, g // (ptp * pk) + 1):
                for b in range(1, (g - a * ptp * pk) // (dtp * dk) + 1):
                    per_node = a * ptp * pk + b * dtp * dk
                    for use in range(1, shape.nodes // span + 1):
                        if per_node * span * use > shape.budget:
                            break
                        yield Placement(p, d, a * use, b * use, span, "Low", links.intra_node, use)


def best_of(plans: list[Placement], rate: float) -> Placement:
    return max(plans, key=lambda p: (p.serves(rate), p.per_gpu))
