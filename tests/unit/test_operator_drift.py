"""When to re-plan, cooldown, hysteresis and replica caps (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from distserve_operator import drift
from distserve_operator.api import (
    AutoscalingMode,
    Candidate,
    Estimate,
    PhasePlan,
    PlanStatus,
    WorkloadSnapshot,
)

ASSUMED = WorkloadSnapshot(requests_per_second=10, input_tokens_mean=500, output_tokens_mean=100)


def _obs(rate: float = 10, inp: float = 500, out: float = 100, att: float | None = 99) -> WorkloadSnapshot:
    return WorkloadSnapshot(
        requests_per_second=rate, input_tokens_mean=inp, output_tokens_mean=out, attainment_percent=att
    )


def _assess(obs: WorkloadSnapshot, drift_percent: int = 20) -> drift.Assessment:
    return drift.assess(ASSUMED, obs, drift_percent=drift_percent, attainment_target=90)


@pytest.mark.parametrize("rate", [9.0, 10.9, 11.0, 9.1, 10.0])
def test_noise_within_ten_percent_is_not_drift(rate: float) -> None:
    a = _assess(_obs(rate))
    assert not a.drifted and a.reason == drift.Reason.WITHIN


def test_noise_band_never_narrower_than_ten_percent() -> None:
    assert not _assess(_obs(10.9), drift_percent=1).drifted
    assert _assess(_obs(11.5), drift_percent=1).drifted


@pytest.mark.parametrize("rate", [20.0, 5.0, 12.5])
def test_rate_beyond_drift_percent_drifts(rate: float) -> None:
    a = _assess(_obs(rate))
    assert a.drifted and a.reason == drift.Reason.RATE
    assert "tolerance" in a.message


def test_length_drift() -> None:
    a = _assess(_obs(inp=800))
    assert a.drifted and a.reason == drift.Reason.LENGTHS and "inputTokensMean" in a.message


def test_low_attainment_drifts_with_a_margin() -> None:
    assert _assess(_obs(att=80)).reason == drift.Reason.ATTAINMENT
    assert not _assess(_obs(att=89)).drifted  # within the 2-point margin of the 90% target
    assert not _assess(_obs(rate=10, att=None)).drifted


def test_no_observation_is_not_drift() -> None:
    assert drift.assess(ASSUMED, None, drift_percent=20, attainment_target=90).reason == drift.Reason.NO_DATA


def test_replan_workload_adds_headroom_only_for_attainment() -> None:
    a = _assess(_obs(att=50))
    w = drift.replan_workload(ASSUMED, _obs(att=50), a)
    assert w.requests_per_second == pytest.approx(12.5)
    w2 = drift.replan_workload(ASSUMED, _obs(rate=20, inp=0), _assess(_obs(rate=20)))
    assert w2.requests_per_second == 20 and w2.input_tokens_mean == 500  # unmeasured length stays as assumed


def test_cooldown() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert drift.in_cooldown(now - timedelta(seconds=10), now, 60)
    assert not drift.in_cooldown(now - timedelta(seconds=61), now, 60)
    assert not drift.in_cooldown(None, now, 60)


def test_only_planner_mode_scales() -> None:
    assert drift.may_scale(AutoscalingMode.PLANNER)
    assert not drift.may_scale(AutoscalingMode.EXTERNAL)
    assert not drift.may_scale(AutoscalingMode.OFF)


def _plan(
    p: tuple[int, int, int], d: tuple[int, int, int], candidates: list[Candidate] | None = None
) -> PlanStatus:
    pp = PhasePlan(tp=p[0], pp=p[1], replicas=p[2], max_rate_per_instance=4.0)
    dd = PhasePlan(tp=d[0], pp=d[1], replicas=d[2], max_rate_per_instance=5.0)
    return PlanStatus(
        prefill=pp,
        decode=dd,
        affinity="High",
        gpus=pp.gpus + dd.gpus,
        summary="",
        estimated=Estimate(goodput_per_gpu=1),
        candidates=candidates or [],
    )


def test_keep_parallelism_uses_matching_shapes_or_per_instance_rates() -> None:
    current = _plan((2, 1, 1), (1, 1, 1))
    same = _plan((2, 1, 3), (1, 1, 2))
    assert drift.keep_parallelism(current, same, 12) is same
    other = _plan(
        (4, 1, 1),
        (1, 1, 1),
        candidates=[
            Candidate(
                prefill=PhasePlan(tp=2, pp=1, replicas=2),
                decode=PhasePlan(tp=1, pp=1, replicas=2),
                gpus=6,
                goodput_per_gpu=1,
                bottleneck="TTFT",
            )
        ],
    )
    kept = drift.keep_parallelism(current, other, 12)
    assert (kept.prefill.tp, kept.prefill.replicas, kept.decode.replicas) == (2, 2, 2)
    resized = drift.keep_parallelism(current, _plan((4, 1, 1), (2, 1, 1)), 12)
    assert (resized.prefill.tp, resized.prefill.replicas, resized.decode.replicas) == (2, 3, 3)


def test_cap_replicas_respects_min_and_gpu_cap() -> None:
    capped = drift.cap_replicas(_plan((2, 1, 4), (1, 1, 4)), max_gpus=6, min_replicas=1)
    assert capped.gpus <= 6 and capped.prefill.replicas >= 1 and capped.decode.replicas >= 1
    raised = drift.cap_replicas(_plan((1, 1, 0), (1, 1, 0)), max_gpus=None, min_replicas=2)
    assert (raised.prefill.replicas, raised.decode.replicas) == (2, 2)
    assert drift.replicas_changed(capped, raised)
