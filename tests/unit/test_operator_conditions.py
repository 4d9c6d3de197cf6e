"""Status derivation (pure): conditions keep their transition time, readiness, merge patches."""

from __future__ import annotations

from distserve_operator import conditions as C
from distserve_operator.api import (
    ConditionType,
    Estimate,
    PhasePlan,
    PlanStatus,
    RoleStatus,
    WorkloadSnapshot,
)

PLAN = PlanStatus(
    prefill=PhasePlan(tp=1, pp=1, replicas=1),
    decode=PhasePlan(tp=1, pp=1, replicas=2),
    affinity="High",
    gpus=3,
    summary="p1 | d2",
    estimated=Estimate(goodput_per_gpu=1),
)


def test_transition_time_moves_only_with_status() -> None:
    c = C.set_condition([], ConditionType.READY, C.F, "A", "m", now="t1", generation=1)
    c = C.set_condition(c, ConditionType.READY, C.F, "B", "m2", now="t2", generation=2)
    assert c[0].last_transition_time == "t1" and c[0].reason == "B" and c[0].observed_generation == 2
    c = C.set_condition(c, ConditionType.READY, C.T, "C", "m3", now="t3", generation=2)
    assert c[0].last_transition_time == "t3"


def test_conditions_are_ordered() -> None:
    c = C.set_condition([], ConditionType.PLAN_DRIFT, C.U, "x", "", now="t", generation=1)
    c = C.set_condition(c, ConditionType.PLANNED, C.T, "x", "", now="t", generation=1)
    assert [x.type for x in c] == [ConditionType.PLANNED, ConditionType.PLAN_DRIFT]


def _types(conds: list) -> dict:  # type: ignore[type-arg]
    return {c.type.value: (c.status.value, c.reason) for c in conds}


def test_rollout_conditions() -> None:
    roles = C.roles_status({"prefill-s0": ("a", 1), "decode-s0": ("b", 2)}, {"a": 1, "b": 1})
    assert roles == [
        RoleStatus(name="prefill-s0", replicas=1, ready_replicas=1),
        RoleStatus(name="decode-s0", replicas=2, ready_replicas=1),
    ]
    t = _types(
        C.rollout_conditions([], roles, PLAN, attainment_target=90, observed=None, now="t", generation=1)
    )
    assert t["Ready"] == ("False", "ReplicasNotReady") and t["Progressing"] == ("True", "RollingOut")
    assert t["Degraded"] == ("False", "AsPlanned")
    done = C.roles_status({"prefill-s0": ("a", 1)}, {"a": 5})
    assert done[0].ready_replicas == 1
    low = WorkloadSnapshot(requests_per_second=1, attainment_percent=50)
    t = _types(
        C.rollout_conditions([], done, PLAN, attainment_target=90, observed=low, now="t", generation=1)
    )
    assert t["Ready"] == ("True", "AllReplicasReady") and t["Degraded"] == ("True", "AttainmentBelowTarget")
    infeasible = PLAN.model_copy(update={"feasible": False})
    t = _types(
        C.rollout_conditions([], done, infeasible, attainment_target=90, observed=None, now="t", generation=1)
    )
    assert t["Degraded"] == ("True", "SloInfeasible")


def test_merge_patch_removes_stale_keys() -> None:
    old = {"plan": {"colocated": {"tp": 1}, "gpus": 2}, "observedGeneration": 1, "same": [1]}
    new = {"plan": {"gpus": 3}, "observedGeneration": 1, "same": [1]}
    assert C.merge_patch(old, new) == {"plan": {"colocated": None, "gpus": 3}}
    assert C.merge_patch(new, new) == {}


def test_time_round_trip() -> None:
    t = C.rfc3339()
    assert t.endswith("Z") and C.parse_time(t) is not None and C.parse_time("junk") is None
