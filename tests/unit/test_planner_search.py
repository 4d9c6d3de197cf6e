"""Search and reports: a known small case, the paper's reference case, infeasible SLOs, Algorithm 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from distserve_operator import api
from distserve_planner import PlanInput, WorkloadModel, plan, plan_deployment
from distserve_planner.architecture import CATALOGUE
from distserve_planner.hardware import BUILTIN, Links
from distserve_planner.latency import LatencyModel, PhaseCoefficients
from distserve_planner.search import ClusterShape, SloTargets
from distserve_planner.workload import Lengths

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "deploy" / "examples"


def _toy_input(**overrides: Any) -> PlanInput:
    """A made-up latency table where the answer is obvious: TP2 prefill is 5x faster than TP1 (so
    2.5x better per GPU), while TP2 decode gains almost nothing (so TP1 is best per GPU)."""
    table = {
        1: PhaseCoefficients((10.0, 0.1, 0.0), ((1, (10.0, 0.0, 0.2)),)),
        2: PhaseCoefficients((2.0, 0.02, 0.0), ((1, (9.5, 0.0, 0.19)),)),
    }
    model = LatencyModel(lambda tp, pp: table.get(tp) if pp == 1 else None, "toy table", "toy has TP1, TP2")
    fields: dict[str, Any] = dict(
        architecture=CATALOGUE["llama-3-8b"],
        device=BUILTIN[api.GpuType.H100_SXM],
        links=Links(300e9, 25e9),
        latency=model,
        slo=SloTargets(ttft_ms=200, tpot_ms=50, attainment=0.9),
        workload=WorkloadModel(rate=5.0, inputs=Lengths(512), outputs=Lengths(64)),
        cluster=ClusterShape(gpus_per_node=4, nodes=1, budget=4),
        affinity=api.Affinity.HIGH,
        n_requests=200,
    )
    fields.update(overrides)
    return PlanInput(**fields)


def test_known_small_case_best_configuration() -> None:
    tight = plan(_toy_input(cluster=ClusterShape(gpus_per_node=4, nodes=1, budget=3))).plan
    assert (tight.prefill.tp, tight.prefill.pp, tight.decode.tp, tight.decode.pp) == (2, 1, 1, 1)
    report = plan(_toy_input())
    p = report.plan
    assert p.feasible
    # With a 4th GPU a decode PP2 pipeline (as good per GPU as TP1) balances TP2 prefill better.
    assert (p.prefill.tp, p.prefill.pp, p.decode.tp) == (2, 1, 1)
    assert p.gpus <= 4 and p.estimated.goodput_per_gpu > 0
    assert p.estimated.goodput is not None and p.estimated.goodput >= 5.0
    assert p.colocated is not None and p.disaggregation_pays is not None
    assert len(p.candidates) >= 2 and p.candidates[0].bottleneck in (api.Bottleneck.TTFT, api.Bottleneck.TPOT)
    # Replicas follow the rate: twice the rate never needs fewer instances.
    doubled = plan(_toy_input(workload=WorkloadModel(rate=60.0, inputs=Lengths(512), outputs=Lengths(64))))
    assert (
        doubled.plan.prefill.replicas + doubled.plan.decode.replicas >= p.prefill.replicas + p.decode.replicas
    )


def test_infeasible_slo_reports_closest_candidate() -> None:
    report = plan(_toy_input(slo=SloTargets(ttft_ms=5, tpot_ms=50, attainment=0.9)))
    p = report.plan
    assert not p.feasible
    assert p.bottleneck is api.Bottleneck.TTFT
    assert "closest candidate" in p.verdict and "ttftMillis" in p.verdict
    assert p.estimated.goodput_per_gpu == 0
    assert p.prefill.replicas == 1  # the closest candidate, not an empty plan
    api.PlanStatus.model_validate(p.to_wire())


def test_plan_status_and_json_contract() -> None:
    report = plan(_toy_input())
    data = report.to_json()
    plan_json = data["plan"]
    for phase in ("prefill", "decode"):
        assert {"tp", "pp", "replicas"} <= set(plan_json[phase])
    assert plan_json["affinity"] == "High" and plan_json["nodeSpan"] == 1
    assert plan_json["estimated"]["goodputPerGPU"] > 0
    assert isinstance(data["searchSeconds"], float)
    assert report.plan is report.status
    api.PlanStatus.model_validate(plan_json)


def test_opt13b_reference_case_matches_the_paper() -> None:
    """The paper's own simulator: prefill TP2 (or PP2) + decode TP1 at 4.53 req/s per GPU. That plan
    is among ours, tied with the one chosen (which has the lower TPOT p90). The example names the
    paper's profile, bundled with the planner: no file outside the repository."""
    dsd = api.load_manifest(EXAMPLES / "opt-13b-a100x4.yaml")
    report = plan_deployment(dsd)
    assert "bundled profile opt-13b-a100-80gb-distserve" in report.plan.profile
    p = report.plan
    assert p.estimated.goodput_per_gpu == pytest.approx(4.53, rel=0.1)
    papers = [c for c in p.candidates if (c.prefill.tp * c.prefill.pp, c.decode.tp, c.decode.pp) == (2, 1, 1)]
    assert papers and papers[0].goodput_per_gpu >= 0.95 * p.estimated.goodput_per_gpu
    assert p.gpus <= 4 and report.search_seconds < 5


def test_low_affinity_keeps_stage_segments_on_a_node() -> None:
    doc = yaml.safe_load((EXAMPLES / "opt-66b-a100-4x8-low.yaml").read_text())
    # At the example's 3 GB/s a stage hop of a 2,048-token prefill batch (38 MB) costs ~13 ms, and
    # the pipelines' gain over one-node TP4 falls within the 5% the search calls a tie (the smaller
    # plan wins). On nodes of 4 GPUs linked at 25 GB/s (200 Gb/s InfiniBand), pipelines across
    # nodes pay: the layout under test.
    doc["spec"]["cluster"]["interconnect"]["interNodeGBps"] = 25
    doc["spec"]["cluster"]["gpusPerNode"], doc["spec"]["cluster"]["nodes"] = 4, 8
    report = plan_deployment(api.parse_resource(doc))
    p = report.plan
    assert p.affinity is api.PlacementAffinity.LOW and p.feasible
    span = p.node_span
    assert span > 1 and p.prefill.pp % span == 0 and p.decode.pp % span == 0, p.summary
    # Some number of node groups, each `nodeSpan` nodes, where every node holds the same segment
    # (pp / span stages) of n_p prefill and n_d decode pipelines, and that fits in 4 GPUs.
    per_node = p.prefill.tp * p.prefill.pp // span * p.prefill.replicas + (
        p.decode.tp * p.decode.pp // span * p.decode.replicas
    )
    assert p.gpus == per_node * span <= 32
    layouts = [
        u
        for u in range(1, 8 // span + 1)
        if p.prefill.replicas % u == 0 and p.decode.replicas % u == 0 and per_node // u <= 4
    ]
    assert layouts, p.summary


def test_auto_affinity_on_one_node_is_high() -> None:
    doc = yaml.safe_load((EXAMPLES / "opt-13b-a100x4.yaml").read_text())
    doc["spec"]["placement"]["affinity"] = "Auto"
    report = plan_deployment(api.parse_resource(doc))
    assert report.plan.affinity is api.PlacementAffinity.HIGH
    assert "one node" in report.assumptions["affinityReason"]


def test_overrides_resize_the_plan() -> None:
    dsd = api.load_manifest(EXAMPLES / "opt-13b-a100x4.yaml")
    small = plan_deployment(dsd, rate_override=0.5)
    assert small.assumptions["requestsPerSecond"] == 0.5
    observed = api.WorkloadSnapshot(
        requests_per_second=3, input_tokens_mean=1500, input_tokens_p90=3000, output_tokens_mean=64
    )
    longer = plan_deployment(dsd.spec, workload_override=observed)
    assert longer.assumptions["meanInputTokens"] > 1000
    assert longer.plan.estimated.goodput_per_gpu < small.plan.estimated.goodput_per_gpu


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_plans(example: str) -> None:
    report = plan_deployment(api.load_manifest(EXAMPLES / example))
    assert report.plan.verdict
    assert report.search_seconds < 10


def test_paper_method_baseline_runs() -> None:
    from dataclasses import replace

    report = plan(replace(_toy_input(n_requests=100), method="paper"))
    assert report.plan.feasible
    assert report.plan.prefill.replicas == report.plan.decode.replicas == 1


def test_decode_capacity_looks_past_a_kernel_change() -> None:
    from distserve_planner.latency import InstanceTiming
    from distserve_planner.search import Context, decode_capacity
    from distserve_planner.workload import Requests

    # Up to 15 rows a step costs 10 ms a row; from 16 a blocked kernel costs 60 ms + 1 ms a row.
    # Under a 100 ms TPOT the first range fits 10 rows and the second 40: capacity is 40 rows'.
    coeff = PhaseCoefficients((1.0, 0.0, 0.0), ((1, (0.0, 0.0, 10.0)), (16, (60.0, 0.0, 1.0))))
    ctx = Context(
        CATALOGUE["llama-3-8b"],
        BUILTIN[api.GpuType.H100_SXM],
        Links(300e9, 25e9),
        LatencyModel(lambda tp, pp: coeff, "toy"),
        SloTargets(ttft_ms=1000, tpot_ms=100, attainment=0.9),
        Requests((0.0, 1.0), (10, 10), (11, 11)),
        2048,
    )
    rate, bottleneck = decode_capacity(ctx, InstanceTiming(coeff, 1, 0.0), kv_tokens=1_000_000)
    assert bottleneck is api.Bottleneck.TPOT
    assert rate == pytest.approx(40 / (100 * 10) * 1e3)
    # Memory for 12 sequences only: the best that fits is 10 rows of the first range.
    rate, bottleneck = decode_capacity(ctx, InstanceTiming(coeff, 1, 0.0), kv_tokens=12 * 21)
    assert rate == pytest.approx(10 / (100 * 10) * 1e3)
