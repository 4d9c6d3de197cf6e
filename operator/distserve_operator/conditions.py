"""Derive `status` (conditions, roles, assumptions) from what the operator knows (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .api import (
    Condition,
    ConditionStatus,
    ConditionType,
    DistServeDeploymentSpec,
    PlanStatus,
    RoleStatus,
    WorkloadSnapshot,
)
from .capacity import Waiting

T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN
ORDER = [
    ConditionType.PLANNED,
    ConditionType.READY,
    ConditionType.PROGRESSING,
    ConditionType.DEGRADED,
    ConditionType.PLAN_DRIFT,
    ConditionType.SCHEDULABLE,
    ConditionType.PROFILED,
]


def rfc3339(when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def set_condition(
    conditions: Iterable[Condition],
    type_: ConditionType,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Replace one condition; `lastTransitionTime` moves only when `status` changes."""
    out: dict[ConditionType, Condition] = {c.type: c for c in conditions}
    previous = out.get(type_)
    since = previous.last_transition_time if previous is not None and previous.status == status else now
    out[type_] = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:1024],
        last_transition_time=since,
        observed_generation=generation,
    )
    return [out[t] for t in ORDER if t in out]


def get_condition(conditions: Iterable[Condition], type_: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def assumptions_from_spec(spec: DistServeDeploymentSpec) -> WorkloadSnapshot:
    w = spec.workload
    return WorkloadSnapshot(
        requests_per_second=w.requests_per_second,
        input_tokens_mean=float(w.input_tokens.mean),
        input_tokens_p90=float(w.input_tokens.p90) if w.input_tokens.p90 else None,
        output_tokens_mean=float(w.output_tokens.mean),
        output_tokens_p90=float(w.output_tokens.p90) if w.output_tokens.p90 else None,
    )


def roles_status(desired: Mapping[str, tuple[str, int]], ready: Mapping[str, int]) -> list[RoleStatus]:
    """`desired`: role -> (object name, replicas); `ready`: object name -> ready replicas."""
    return [
        RoleStatus(
            name=role, replicas=replicas, ready_replicas=min(ready.get(obj, 0), replicas) if replicas else 0
        )
        for role, (obj, replicas) in desired.items()
    ]


def rollout_conditions(
    conditions: list[Condition],
    roles: list[RoleStatus],
    plan: PlanStatus,
    *,
    attainment_target: float,
    observed: WorkloadSnapshot | None,
    now: str,
    generation: int | None,
    notices: Sequence[tuple[str, str]] = (),
) -> list[Condition]:
    """Ready, Progressing and Degraded from replica counts, plan feasibility and attainment;
    `notices` are (reason, message) pairs of spec requests the operator could not honour."""
    pending = [r for r in roles if r.ready_replicas < r.replicas]
    empty = [r for r in roles if r.replicas > 0 and r.ready_replicas == 0]
    if pending:
        text = ", ".join(f"{r.name} {r.ready_replicas}/{r.replicas}" for r in pending)
        conditions = set_condition(
            conditions,
            ConditionType.READY,
            F,
            "ReplicasNotReady",
            f"waiting for ready replicas: {text}",
            now=now,
            generation=generation,
        )
        conditions = set_condition(
            conditions,
            ConditionType.PROGRESSING,
            T,
            "RollingOut",
            f"rolling out {drift_summary(plan)}",
            now=now,
            generation=generation,
        )
    else:
        conditions = set_condition(
            conditions,
            ConditionType.READY,
            T,
            "AllReplicasReady",
            f"serving with {drift_summary(plan)}",
            now=now,
            generation=generation,
        )
        conditions = set_condition(
            conditions,
            ConditionType.PROGRESSING,
            F,
            "Stable",
            "every role has its desired ready replicas",
            now=now,
            generation=generation,
        )
    degraded: list[tuple[str, str]] = list(notices)
    if not plan.feasible:
        degraded.append(
            ("SloInfeasible", f"no candidate meets the SLO within the GPU budget; closest: {plan.summary}")
        )
    attained = observed.attainment_percent if observed else None
    if attained is not None and attained < attainment_target:
        degraded.append(
            (
                "AttainmentBelowTarget",
                f"observed SLO attainment {attained:.1f}% < target {attainment_target:.0f}%",
            )
        )
    # A role with no ready pod while the rest serves means requests cannot complete at all.
    if empty and len(empty) < len(roles) and any(r.ready_replicas for r in roles):
        degraded.append(("RoleUnavailable", "no ready replica: " + ", ".join(r.name for r in empty)))
    if degraded:
        conditions = set_condition(
            conditions,
            ConditionType.DEGRADED,
            T,
            degraded[0][0],
            "; ".join(m for _, m in degraded),
            now=now,
            generation=generation,
        )
    else:
        conditions = set_condition(
            conditions,
            ConditionType.DEGRADED,
            F,
            "AsPlanned",
            "no degradation detected",
            now=now,
            generation=generation,
        )
    return conditions


def schedulable_condition(
    conditions: list[Condition],
    waiting: Waiting,
    plan: PlanStatus,
    *,
    allocatable: int | None,
    where: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Schedulable: False while worker pods wait for resources the cluster does not have, with the
    counts (GPUs the plan wants, GPUs allocatable to it) and the scheduler's word."""
    if not waiting.pods:
        return set_condition(
            conditions,
            ConditionType.SCHEDULABLE,
            T,
            "Scheduled",
            f"no worker pod waits for resources (the plan wants {plan.gpus} GPUs)",
            now=now,
            generation=generation,
        )
    short = "GPUs" if "gpu" in waiting.message.lower() or waiting.gpus else "resources"
    counts = (
        f"the plan wants {plan.gpus} GPUs, {allocatable} are allocatable to it"
        if allocatable is not None
        else (f"the plan wants {plan.gpus} GPUs; allocatable GPUs unknown (the operator cannot read nodes)")
    )
    fix = (
        "re-planning within what is allocatable once they have waited past the grace period"
        if not plan.pinned
        else "the plan is pinned (spec.planner.pin): free GPUs or change the pin"
    )
    return set_condition(
        conditions,
        ConditionType.SCHEDULABLE,
        F,
        "InsufficientGPUs" if short == "GPUs" else "Unschedulable",
        f"{waiting.pods} worker pod(s) Pending for want of {short} ({waiting.gpus} GPUs): {counts}"
        + (f" ({where})" if where else "")
        + f"; scheduler: {waiting.message}; {fix}",
        now=now,
        generation=generation,
    )


def drift_summary(plan: PlanStatus) -> str:
    return plan.summary or f"prefill ×{plan.prefill.replicas} | decode ×{plan.decode.replicas}"


def merge_patch(old: Any, new: Any) -> Any:
    """A JSON merge patch turning `old` into `new` (removed keys become None)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch
