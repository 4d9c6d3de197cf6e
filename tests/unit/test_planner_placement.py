"""The placement search against brute force: every deployment of the plan space enumerated and
scored with the same per-instance rates (the simulator's), and the search's pick held to the best.

What would fail here is a search that does not consider part of the space (a phase's intra-node
depth under Low affinity, a split of the budget between phases), which is how the planner used to
leave goodput behind."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for planner_support
from planner_support.brute import best_of, brute_high, brute_low, case_input, context

from distserve_operator import api
from distserve_planner import plan
from distserve_planner.core import Outcomes
from distserve_planner.placement import EQUIVALENT_SHARE, choose, high_affinity, low_affinity

CASES = [
    # model, GPUs per node, nodes, rate, TTFT ms, TPOT ms, extra
    ("opt-13b", 4, 1, 10.0, 200, 100, {}),
    ("opt-13b", 4, 1, 40.0, 150, 60, {}),
    ("llama-3-8b", 4, 2, 30.0, 120, 40, {}),
    ("llama-3-8b", 2, 3, 200.0, 300, 30, {"inter": 10e9}),  # the budget cannot serve it
    ("opt-13b", 4, 2, 25.0, 400, 80, {"inter": 5e9, "inputs": 1024}),
]


@pytest.mark.parametrize("affinity", ["High", "Low"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-{c[3]:g}rps" for c in CASES])
def test_search_finds_what_brute_force_finds(case: tuple[Any, ...], affinity: str) -> None:
    model, g, nodes, rate, ttft, tpot, extra = case
    inp = case_input(model, g, nodes, rate, ttft, tpot, **extra)
    ctx, shape = context(inp), inp.cluster
    search, brute = (high_affinity, brute_high) if affinity == "High" else (low_affinity, brute_low)
    found, _ = search(ctx, shape, rate)
    every = list(brute(ctx, shape, rate))
    assert every, "the case has feasible plans"
    best = best_of(every, rate)
    pick = choose(found, rate, Outcomes(inp, ctx, rate).tpot_p90).plans[0]
    assert pick.serves(rate) == best.serves(rate)
    assert pick.per_gpu >= EQUIVALENT_SHARE * best.per_gpu, (
        pick.shape,
        best.shape,
        pick.per_gpu,
        best.per_gpu,
    )
    # Nothing the search scores lies outside the space brute force enumerates.
    assert {p.shape for p in found} <= {p.shape for p in every}


@pytest.mark.parametrize(
    "case",
    [
        ("opt-13b", 4, 1, 10.0, 200, 100, {}),
        ("opt-13b", 8, 1, 20.0, 250, 50, {}),
        ("llama-3-8b", 4, 1, 50.0, 100, 30, {}),
        ("opt-66b", 8, 1, 2.0, 2500, 150, {}),
        ("llama-3-8b", 8, 1, 300.0, 200, 25, {}),
    ],
)
def test_on_one_node_low_plans_at_least_as_well_as_high(case: tuple[Any, ...]) -> None:
    """One node has no network between stages: Algorithm 2's space holds Algorithm 1's."""
    model, g, nodes, rate, ttft, tpot, extra = case
    high = plan(case_input(model, g, nodes, rate, ttft, tpot, **extra)).plan
    low = plan(case_input(model, g, nodes, rate, ttft, tpot, affinity=api.Affinity.LOW, **extra)).plan
    assert low.affinity is api.PlacementAffinity.LOW
    assert low.feasible == high.feasible
    assert low.estimated.goodput_per_gpu >= EQUIVALENT_SHARE * high.estimated.goodput_per_gpu


def test_low_affinity_finds_different_depths_per_phase() -> None:
    """Two nodes of 8 linked at 12.5 GB/s, OPT-66B: the pipelines span both nodes, and inside each
    node prefill and decode take different depths."""
    inp = case_input("opt-66b", 8, 2, 6.0, 1500, 120, inter=12.5e9, affinity=api.Affinity.LOW)
    ctx = context(inp)
    every = list(brute_low(ctx, inp.cluster, 6.0))
    best = best_of(every, 6.0)
    report = plan(inp)
    p = report.plan
    assert p.affinity is api.PlacementAffinity.LOW and p.node_span == 2, report.table()
    assert p.prefill.pp // p.node_span != p.decode.pp // p.node_span, report.table()
    assert p.estimated.goodput_per_gpu >= EQUIVALENT_SHARE * best.per_gpu


def test_a_tie_goes_to_the_lower_tpot_then_to_fewer_gpus() -> None:
    inp = case_input("opt-13b", 4, 1, 10.0, 200, 100)
    ctx = context(inp)
    found, _ = high_affinity(ctx, inp.cluster, 10.0)
    best = max(p.per_gpu for p in found if p.serves(10.0))
    tied = [p for p in found if p.serves(10.0) and p.per_gpu >= EQUIVALENT_SHARE * best]
    assert len(tied) >= 2, "the case has a tie to break"
    # Made-up TPOTs: the largest plan is fastest by far, the rest within 5% of each other.
    largest = max(tied, key=lambda p: p.gpus)
    fast = choose(found, 10.0, lambda p: 10.0 if p is largest else 50.0)
    assert fast.plans[0] is largest and "lowest predicted TPOT p90 (10.0 ms" in fast.reason
    even = choose(found, 10.0, lambda p: 50.0 + p.gpus * 0.1)  # all within 5%: the fewest GPUs
    assert even.plans[0].gpus == min(p.gpus for p in tied)
    assert "fewest GPUs" in even.reason
    report = plan(inp)
    assert "Chosen:" in report.plan.verdict and report.assumptions["choice"]
