"""spec.serving.mode: which mode a plan deploys (pure decision) and what the plan then says."""

from __future__ import annotations

from pathlib import Path

import pytest

from distserve_operator import api
from distserve_planner import plan_deployment
from distserve_planner.memory import Fit
from distserve_planner.mode import ColocatedNotRunnable, decide
from distserve_planner.search import PhaseResult

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
Mode, Serving = api.PlanMode, api.ServingMode


def coloc(tp: int, pp: int, per_gpu: float, fits: bool = True) -> PhaseResult:
    fit = Fit(tp, pp, 1, 10_000 if fits else 0, "" if fits else "memory: weights need 99 GiB per GPU")
    rate = per_gpu * tp * pp if fits else 0.0
    reason = "" if rate > 0 else (fit.reason or "TTFT: too slow")
    return PhaseResult("colocated", tp, pp, rate, api.Bottleneck.TTFT, fit, reason=reason)


def test_disaggregated_is_what_runs_when_asked_for_whatever_the_verdict() -> None:
    d = decide(Serving.DISAGGREGATED, 1.0, [coloc(1, 1, 9.0)])
    assert d.mode is Mode.DISAGGREGATED and d.colocated is None


def test_auto_deploys_colocated_when_disaggregation_does_not_pay() -> None:
    d = decide(Serving.AUTO, 2.0, [coloc(1, 1, 3.0)])
    assert d.mode is Mode.COLOCATED and (d.colocated.tp, d.colocated.pp) == (1, 1)  # type: ignore[union-attr]
    assert "does not pay" in d.reason and "3.00" in d.reason and "2.00" in d.reason


def test_auto_keeps_disaggregation_when_it_pays() -> None:
    d = decide(Serving.AUTO, 4.0, [coloc(1, 1, 3.0)])
    assert d.mode is Mode.DISAGGREGATED and "pays" in d.reason


def test_auto_only_deploys_a_colocated_shape_the_worker_runs_and_says_so() -> None:
    # TP2 colocated would beat disaggregation, but the colocated worker runs TP1xPP1 only.
    d = decide(Serving.AUTO, 2.0, [coloc(2, 1, 5.0), coloc(1, 1, 1.0)])
    assert d.mode is Mode.DISAGGREGATED
    assert "TP2xPP1" in d.reason and "TP1xPP1 only" in d.reason


def test_auto_with_a_pin_runs_the_pinned_disaggregated_plan() -> None:
    d = decide(Serving.AUTO, 1.0, [coloc(1, 1, 9.0)], pinned=True)
    assert d.mode is Mode.DISAGGREGATED and "pin" in d.reason


def test_auto_goes_colocated_when_only_colocated_meets_the_slo() -> None:
    d = decide(Serving.AUTO, None, [coloc(1, 1, 0.5)])
    assert d.mode is Mode.COLOCATED and "no disaggregated plan meets the SLO" in d.reason


def test_colocated_that_cannot_fit_is_refused_naming_the_field_and_the_fix() -> None:
    with pytest.raises(ColocatedNotRunnable, match=r"spec\.serving\.mode Colocated.*memory.*Disaggregated"):
        decide(Serving.COLOCATED, 1.0, [coloc(1, 1, 0.0, fits=False), coloc(2, 1, 3.0)])


def test_colocated_that_misses_the_slo_still_runs_and_says_so() -> None:
    slow = PhaseResult("colocated", 1, 1, 0.0, api.Bottleneck.TTFT, Fit(1, 1, 1, 10_000), reason="TTFT: 9 s")
    d = decide(Serving.COLOCATED, 1.0, [slow])
    assert d.mode is Mode.COLOCATED and "miss the SLO" in d.reason and "TTFT: 9 s" in d.reason


def _spec(example: str, mode: str) -> api.DistServeDeploymentSpec:
    spec = api.load_manifest(EXAMPLES / example).spec
    return spec.model_copy(update={"serving": api.ServingSpec(mode=api.ServingMode(mode))})


def test_plan_in_auto_mode_deploys_the_colocated_instances_and_explains_it() -> None:
    # Llama-3-8B on H100s at 10 req/s: the verdict is that disaggregation does not pay.
    report = plan_deployment(_spec("llama3-8b-h100x8.yaml", "Auto"))
    p = report.plan
    assert p.mode is Mode.COLOCATED and p.disaggregation_pays is False
    c = p.colocated
    assert c is not None and (c.tp, c.pp) == (1, 1) and c.replicas >= 1
    assert p.gpus == c.gpus and p.summary == f"colocated TP1xPP1 ×{c.replicas}"
    assert p.limits == c.limits and c.limits is not None
    assert p.estimated.goodput_per_gpu == c.goodput_per_gpu and p.estimated.attainment_percent is not None
    assert p.mode_reason.startswith("spec.serving.mode Auto: disaggregation does not pay")
    assert p.verdict.startswith("Mode Colocated:")  # what the Planned condition shows
    # The disaggregated alternative stays, for comparison.
    assert p.prefill.replicas >= 1 and p.candidates
    table = report.table()
    assert "mode       Colocated" in table and "colocated TP1 PP1" in table and "(alt) prefill" in table
    wire = p.to_wire()
    assert wire["mode"] == "Colocated" and wire["modeReason"] == p.mode_reason


def test_default_mode_is_disaggregated_with_the_same_plan_as_before() -> None:
    spec = api.load_manifest(EXAMPLES / "llama3-8b-h100x8.yaml").spec
    assert spec.serving.mode is Serving.DISAGGREGATED
    p = plan_deployment(spec).plan
    assert p.mode is Mode.DISAGGREGATED and p.summary.startswith("prefill ")
    assert not p.verdict.startswith("Mode")


def test_colocated_mode_that_cannot_run_is_a_planning_error_with_the_fix() -> None:
    # OPT-66B does not fit one A100: the colocated worker's one device cannot hold it.
    with pytest.raises(
        ValueError, match=r"spec\.serving\.mode Colocated.*TP1xPP1 only.*Disaggregated or Auto"
    ):
        plan_deployment(_spec("opt-66b-a100-4x8-low.yaml", "Colocated"))
