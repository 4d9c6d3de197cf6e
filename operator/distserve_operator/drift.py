"""When observed traffic warrants a re-plan, and whether a new plan's replica counts get applied.

Pure: time comes in as a parameter. The rules, in order:

1. Drift: the observed rate, mean prompt length or mean output length differs from what the plan
   assumed by more than `driftPercent` (never less than the 10% noise band), or SLO attainment
   is below the target. Otherwise nothing happens.
2. Cooldown: no scaling change within `cooldownSeconds` of the previous one.
3. Hysteresis: after a re-plan the observed workload becomes the plan's assumptions, so the next
   comparison starts from the new level; noise around it stays inside the band and never flips
   replicas back and forth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from .api import AutoscalingMode, PhasePlan, PlanStatus, WorkloadSnapshot
from .api.status import PlanMode

NOISE_PERCENT = 10.0
# Attainment must fall this many points below the target: a 90% target measured as 89.5% on a
# short window is noise, not a reason to buy GPUs.
ATTAINMENT_MARGIN_PERCENT = 2.0
# When attainment is low but the workload looks as assumed, plan for this much more rate.
ATTAINMENT_HEADROOM = 1.25


class Reason:
    RATE = "RateDrift"
    LENGTHS = "LengthDrift"
    ATTAINMENT = "AttainmentBelowTarget"
    WITHIN = "WithinTolerance"
    NO_DATA = "NoObservations"


@dataclass(frozen=True)
class Assessment:
    drifted: bool
    reason: str  # one of Reason
    message: str
    deviations: dict[str, float]  # field -> relative deviation, percent (signed)


def _dev(observed: float | None, assumed: float | None) -> float | None:
    if observed is None or assumed is None:
        return None
    if assumed <= 0:
        return 0.0 if observed <= 0 else math.inf
    return 100.0 * (observed - assumed) / assumed


def assess(
    assumed: WorkloadSnapshot | None,
    observed: WorkloadSnapshot | None,
    *,
    drift_percent: float,
    attainment_target: float,
) -> Assessment:
    if assumed is None or observed is None:
        return Assessment(False, Reason.NO_DATA, "no traffic observed yet", {})
    band = max(float(drift_percent), NOISE_PERCENT)
    deviations = {
        k: v
        for k, v in {
            "requestsPerSecond": _dev(observed.requests_per_second, assumed.requests_per_second),
            "inputTokensMean": _dev(observed.input_tokens_mean, assumed.input_tokens_mean),
            "outputTokensMean": _dev(observed.output_tokens_mean, assumed.output_tokens_mean),
        }.items()
        if v is not None
    }
    over = {k: v for k, v in deviations.items() if abs(v) > band}
    if "requestsPerSecond" in over:
        v = over["requestsPerSecond"]
        return Assessment(
            True,
            Reason.RATE,
            f"request rate {observed.requests_per_second:.3g}/s is {v:+.0f}% from the planned "
            f"{assumed.requests_per_second:.3g}/s (tolerance ±{band:.0f}%)",
            deviations,
        )
    if over:
        parts = ", ".join(f"{k} {v:+.0f}%" for k, v in over.items())
        return Assessment(
            True, Reason.LENGTHS, f"token lengths drifted: {parts} (tolerance ±{band:.0f}%)", deviations
        )
    attained = observed.attainment_percent
    if (
        attained is not None
        and observed.requests_per_second > 0
        and attained < attainment_target - ATTAINMENT_MARGIN_PERCENT
    ):
        return Assessment(
            True,
            Reason.ATTAINMENT,
            f"SLO attainment {attained:.1f}% is below the {attainment_target:.0f}% target",
            deviations,
        )
    return Assessment(False, Reason.WITHIN, f"observed workload within ±{band:.0f}% of the plan", deviations)


def replan_workload(
    assumed: WorkloadSnapshot, observed: WorkloadSnapshot, assessment: Assessment
) -> WorkloadSnapshot:
    """The workload to plan for: what was observed; lengths not measured stay as assumed; when
    only attainment is low, extra rate headroom (the model underestimates this deployment)."""
    rate = observed.requests_per_second
    if assessment.reason == Reason.ATTAINMENT:
        rate = max(rate, assumed.requests_per_second) * ATTAINMENT_HEADROOM
    return WorkloadSnapshot(
        requests_per_second=round(rate, 6),
        input_tokens_mean=observed.input_tokens_mean or assumed.input_tokens_mean,
        input_tokens_p90=observed.input_tokens_p90 or assumed.input_tokens_p90,
        output_tokens_mean=observed.output_tokens_mean or assumed.output_tokens_mean,
        output_tokens_p90=observed.output_tokens_p90 or assumed.output_tokens_p90,
        attainment_percent=observed.attainment_percent,
        window_seconds=observed.window_seconds,
        time=observed.time,
    )


def in_cooldown(last_change: datetime | None, now: datetime, cooldown_seconds: float) -> bool:
    return last_change is not None and (now - last_change).total_seconds() < cooldown_seconds


def may_scale(mode: AutoscalingMode) -> bool:
    return mode is AutoscalingMode.PLANNER


def keep_parallelism(current: PlanStatus, proposed: PlanStatus, target_rate: float) -> PlanStatus:
    """Scope Replicas: keep the running tp/pp and size replicas for the new rate.

    Uses the proposed plan when its shapes already match; otherwise a candidate with the same
    shapes; otherwise scales each phase by its per-instance rate (or by the rate ratio)."""
    if current.mode is PlanMode.COLOCATED and current.colocated is not None:
        c, p = current.colocated, proposed.colocated
        if proposed.mode is PlanMode.COLOCATED and p is not None and (p.tp, p.pp) == (c.tp, c.pp):
            return proposed
        per = c.max_rate_per_instance
        replicas = max(1, math.ceil(target_rate / per)) if per else c.replicas
        return current.model_copy(
            update={"colocated": c.model_copy(update={"replicas": replicas}), "gpus": c.tp * c.pp * replicas}
        )
    if _same_shape(current.prefill, proposed.prefill) and _same_shape(current.decode, proposed.decode):
        return proposed
    for cand in proposed.candidates:
        if _same_shape(current.prefill, cand.prefill) and _same_shape(current.decode, cand.decode):
            return current.model_copy(
                update={
                    "prefill": current.prefill.model_copy(update={"replicas": cand.prefill.replicas}),
                    "decode": current.decode.model_copy(update={"replicas": cand.decode.replicas}),
                    "gpus": cand.gpus,
                }
            )
    return current.model_copy(
        update={
            "prefill": _resize(current.prefill, target_rate),
            "decode": _resize(current.decode, target_rate),
        }
    )


def _same_shape(a: PhasePlan, b: PhasePlan) -> bool:
    return a.tp == b.tp and a.pp == b.pp


def _resize(phase: PhasePlan, rate: float) -> PhasePlan:
    per = phase.max_rate_per_instance
    if not per:
        return phase
    return phase.model_copy(update={"replicas": max(1, math.ceil(rate / per))})


def cap_replicas(plan: PlanStatus, *, max_gpus: int | None, min_replicas: int) -> PlanStatus:
    """Keep each role at or above `min_replicas` and the total under `max_gpus` (scaling down the
    larger role first)."""
    if plan.mode is PlanMode.COLOCATED and plan.colocated is not None:
        c = plan.colocated
        n = max(c.replicas, min_replicas, 1)
        if max_gpus is not None:
            n = max(1, min(n, max_gpus // c.gpus_per_instance))
        return plan.model_copy(
            update={"colocated": c.model_copy(update={"replicas": n}), "gpus": n * c.gpus_per_instance}
        )
    prefill = max(plan.prefill.replicas, min_replicas)
    decode = max(plan.decode.replicas, min_replicas)

    def gpus(p: int, d: int) -> int:
        return p * plan.prefill.gpus_per_instance + d * plan.decode.gpus_per_instance

    if max_gpus is not None:
        while gpus(prefill, decode) > max_gpus and (
            prefill > max(min_replicas, 1) or decode > max(min_replicas, 1)
        ):
            if (
                prefill * plan.prefill.gpus_per_instance >= decode * plan.decode.gpus_per_instance
                and prefill > max(min_replicas, 1)
            ):
                prefill -= 1
            elif decode > max(min_replicas, 1):
                decode -= 1
            else:
                prefill -= 1
    return plan.model_copy(
        update={
            "prefill": plan.prefill.model_copy(update={"replicas": prefill}),
            "decode": plan.decode.model_copy(update={"replicas": decode}),
            "gpus": gpus(prefill, decode),
        }
    )


def replicas_changed(current: PlanStatus, proposed: PlanStatus) -> bool:
    return instances(current) != instances(proposed)


def instances(plan: PlanStatus) -> dict[str, int]:
    """role -> instances that serve it (a colocated instance serves both)."""
    if plan.mode is PlanMode.COLOCATED and plan.colocated is not None:
        return {"prefill": plan.colocated.replicas, "decode": plan.colocated.replicas}
    return {"prefill": plan.prefill.replicas, "decode": plan.decode.replicas}


def summary(plan: PlanStatus) -> str:
    if plan.mode is PlanMode.COLOCATED and plan.colocated is not None:
        c = plan.colocated
        return f"colocated TP{c.tp}xPP{c.pp} ×{c.replicas}"

    def phase(name: str, p: PhasePlan) -> str:
        return f"{name} TP{p.tp}xPP{p.pp} ×{p.replicas}"

    return f"{phase('prefill', plan.prefill)} | {phase('decode', plan.decode)}"
