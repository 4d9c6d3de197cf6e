"""Whether an observation leads to a re-plan, and whether the re-plan's replica counts are applied (pure).

The operator's traffic observer calls `consider()` with what it read, plans when told to, then
`adopt()` with the planner's answer. A replay of a traffic trace calls the same two functions
with a virtual clock (tests/unit/test_operator_scaling_replay.py), so what it shows is what the
operator does. The rules, on top of drift.py's (drift beyond the band, cooldown, hysteresis):

- Coordinated: one plan sets both roles, so prefill and decode move together to the plan's ratio;
  never below `minReplicas`, never above `maxGPUs` (drift.cap_replicas).
- New pods count as capacity only once Ready: while instances the last change added are not
  Ready yet, low SLO attainment is what their absence looks like, not a reason to add more.
- No scale-down while a role has instances that are not Ready (Pending or starting): removing
  ready capacity while the replacement is not there would drop below what serves now.
- No re-plan while a staged rollout is in progress: it finishes first (rollout.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from . import drift
from .api import (
    Autoscaling,
    PlanStatus,
    ReplanScope,
    WorkloadSnapshot,
)

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Decision:
    """`workload`: plan for it now (None: do not re-plan); `held`: why not, for the PlanDrift message."""

    assessment: drift.Assessment
    workload: WorkloadSnapshot | None = None
    held: str = ""


def not_ready(desired: Mapping[str, int], ready: Mapping[str, int]) -> dict[str, int]:
    """role -> instances wanted but not Ready yet."""
    return {r: max(0, int(desired.get(r, 0)) - int(ready.get(r, 0))) for r in ROLES}


def consider(
    *,
    assumed: WorkloadSnapshot | None,
    observed: WorkloadSnapshot,
    auto: Autoscaling,
    attainment_target: float,
    last_change: datetime | None,
    now: datetime,
    rollout_in_progress: bool,
    pending: Mapping[str, int],
) -> Decision:
    assessment = drift.assess(
        assumed, observed, drift_percent=auto.drift_percent, attainment_target=attainment_target
    )
    if not assessment.drifted or assumed is None:
        return Decision(assessment)
    if not drift.may_scale(auto.mode):
        return Decision(assessment, held=f"autoscaling.mode {auto.mode.value}: reported, not acted on")
    if drift.in_cooldown(last_change, now, auto.cooldown_seconds):
        assert last_change is not None
        left = auto.cooldown_seconds - (now - last_change).total_seconds()
        return Decision(assessment, held=f"in cooldown for {left:.0f}s more (autoscaling.cooldownSeconds)")
    if rollout_in_progress:
        return Decision(assessment, held="a staged rollout is in progress; it finishes first")
    waiting = {r: n for r, n in pending.items() if n}
    if assessment.reason == drift.Reason.ATTAINMENT and waiting:
        return Decision(
            assessment,
            held="capacity the last change added is not Ready yet ("
            + ", ".join(f"{r} {n}" for r, n in waiting.items())
            + "); attainment is judged once it serves",
        )
    return Decision(assessment, drift.replan_workload(assumed, observed, assessment))


@dataclass(frozen=True)
class Adoption:
    """`plan`: apply it (None: keep the current one); `message`: what changed or why not."""

    plan: PlanStatus | None
    message: str


def adopt(
    current: PlanStatus,
    proposed: PlanStatus,
    *,
    auto: Autoscaling,
    workload: WorkloadSnapshot,
    pending: Mapping[str, int],
    parallelism_hash: Callable[[PlanStatus], str],
) -> Adoption:
    """The plan to apply after a re-plan for `workload`, or why the current one stays."""
    if auto.scope is ReplanScope.REPLICAS:
        proposed = drift.keep_parallelism(current, proposed, workload.requests_per_second)
    if not proposed.pinned:
        proposed = drift.cap_replicas(proposed, max_gpus=auto.max_gpus, min_replicas=auto.min_replicas)
    proposed = proposed.model_copy(update={"summary": drift.summary(proposed)})
    reshaped = parallelism_hash(current) != parallelism_hash(proposed)
    if not drift.replicas_changed(current, proposed) and not reshaped:
        return Adoption(None, f"the plan for it is the running one: {drift.summary(current)}")
    before, after = drift.instances(current), drift.instances(proposed)
    shrinking = [r for r in ROLES if after[r] < before[r] and not reshaped]
    waiting = {r: n for r, n in pending.items() if n}
    if shrinking and waiting:
        return Adoption(
            None,
            f"scale-down of {', '.join(shrinking)} held while "
            + ", ".join(f"{r} has {n} instance(s) not Ready" for r, n in waiting.items()),
        )
    return Adoption(proposed, f"{drift.summary(current)} -> {drift.summary(proposed)}")
