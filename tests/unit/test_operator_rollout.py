"""Staged rollouts (pure): each step from the live groups, and what the operator prunes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from distserve_operator import drift, rollout, scaling
from distserve_operator.api import Autoscaling, Estimate, PhasePlan, PlanStatus, WorkloadSnapshot
from distserve_operator.reconcile import _kept_by_rollout
from distserve_operator.rollout import Group, StepName

P, D = frozenset({"prefill"}), frozenset({"decode"})
BOTH = frozenset({"prefill", "decode"})


def g(
    name: str,
    rev: str,
    roles: frozenset[str],
    desired: int,
    ready: int,
    pods: int | None = None,
    stage: int = 0,
) -> Group:
    return Group(name, rev, roles, stage, desired, desired if pods is None else pods, ready)


OLD = [g("p-old", "a", P, 2, 2), g("d-old", "a", D, 3, 3)]
WANT = {"prefill": 1, "decode": 2}


def test_no_old_revision_means_no_rollout() -> None:
    assert not rollout.step([g("p", "b", P, 1, 0), g("d", "b", D, 2, 0)], "b", WANT).in_progress


def test_old_groups_keep_serving_until_every_new_instance_is_ready() -> None:
    half = [*OLD, g("p-new", "b", P, 1, 1), g("d-new", "b", D, 2, 1)]
    s = rollout.step(half, "b", WANT)
    assert s.step == StepName.STARTING_NEW and not s.scale and not s.remove
    assert [(r.name, r.old_ready, r.new_ready, r.new_desired) for r in s.roles] == [
        ("prefill", 2, 1, 1),
        ("decode", 3, 1, 2),
    ]
    ready = [*OLD, g("p-new", "b", P, 1, 1), g("d-new", "b", D, 2, 2)]
    s = rollout.step(ready, "b", WANT)
    assert s.step == StepName.DRAINING_OLD and s.scale == {"p-old": 0, "d-old": 0}


def test_an_instance_is_ready_only_when_every_stage_is() -> None:
    # New decode has two stages: 2 and 1 ready pods -> one ready instance.
    groups = [
        *OLD,
        g("p-new", "b", P, 1, 1),
        g("d-new-s0", "b", D, 2, 2),
        g("d-new-s1", "b", D, 2, 1, stage=1),
    ]
    assert rollout.ready_instances(groups, "b", "decode") == 1
    assert rollout.step(groups, "b", WANT).step == StepName.STARTING_NEW


def test_drained_revisions_are_removed_and_idle_ones_go_at_once() -> None:
    draining = [
        g("p-old", "a", P, 0, 0, pods=1),
        g("d-old", "a", D, 0, 0, pods=0),
        g("p", "b", P, 1, 1),
        g("d", "b", D, 2, 2),
    ]
    assert rollout.step(draining, "b", WANT).step == StepName.DRAINING_OLD
    gone = [
        g("p-old", "a", P, 0, 0, pods=0),
        g("d-old", "a", D, 0, 0, pods=0),
        g("p", "b", P, 1, 1),
        g("d", "b", D, 2, 2),
    ]
    s = rollout.step(gone, "b", WANT)
    assert s.step == StepName.REMOVING_OLD and s.remove == ("a",)
    # An old revision with no ready instance protects nothing: it goes before the new one is ready.
    broken = [g("p-old", "a", P, 2, 0), g("d-old", "a", D, 3, 0), g("p", "b", P, 1, 0), g("d", "b", D, 2, 0)]
    assert rollout.step(broken, "b", WANT).scale == {"p-old": 0, "d-old": 0}


def test_a_full_cluster_frees_one_spare_old_instance_at_a_time() -> None:
    new = [g("p", "b", P, 1, 0), g("d", "b", D, 2, 0)]
    s = rollout.step([*OLD, *new], "b", WANT, make_room=True)
    assert s.step == StepName.MAKING_ROOM and s.scale == {"p-old": 1}
    # The last ready instance of a role is never given up.
    last = [g("p-old", "a", P, 1, 1), g("d-old", "a", D, 1, 1), *new]
    assert rollout.step(last, "b", WANT, make_room=True).step == StepName.STARTING_NEW


def test_groups_from_before_revisions_are_an_old_revision() -> None:
    legacy = {
        "metadata": {
            "name": "llm-prefill-s0",
            "labels": {"distserve.io/role": "prefill", "distserve.io/serves-prefill": "true"},
        },
        "spec": {"replicas": 2},
        "status": {"replicas": 2, "readyReplicas": 2},
    }
    group = rollout.group_of(legacy)
    assert (group.revision, group.roles, group.ready) == (rollout.LEGACY, P, 2)
    s = rollout.step([group, g("d-old", "", D, 1, 1), g("p", "b", P, 1, 0), g("d", "b", D, 2, 0)], "b", WANT)
    assert s.old_revisions == ("",) and s.step == StepName.STARTING_NEW
    # While it drains, its StatefulSets and the Services named like them are kept; nothing else.
    svc = {"kind": "Service", "metadata": {"name": "llm-prefill-s0", "labels": {}}}
    cm = {"kind": "ConfigMap", "metadata": {"name": "llm-plan-a", "labels": {"distserve.io/revision": "a"}}}
    assert _kept_by_rollout(svc, {""}, {"llm-prefill-s0"})
    assert not _kept_by_rollout(svc, set(), {"llm-prefill-s0"})
    assert _kept_by_rollout(cm, {"a"}, set()) and not _kept_by_rollout(cm, {"c"}, set())


def test_colocated_groups_serve_both_roles() -> None:
    groups = [*OLD, g("c", "b", BOTH, 2, 2)]
    assert rollout.step(groups, "b", {"prefill": 2, "decode": 2}).step == StepName.DRAINING_OLD


# ---------------------------------------------------------------------------- scaling gates


AUTO = Autoscaling(mode="Planner", interval_seconds=60, cooldown_seconds=300, drift_percent=20)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
ASSUMED = WorkloadSnapshot(requests_per_second=100, input_tokens_mean=512, output_tokens_mean=128)


def _consider(observed: WorkloadSnapshot, **kw) -> scaling.Decision:  # type: ignore[no-untyped-def]
    args = {"last_change": None, "rollout_in_progress": False, "pending": {"prefill": 0, "decode": 0}, **kw}
    return scaling.consider(
        assumed=ASSUMED, observed=observed, auto=AUTO, attainment_target=90, now=NOW, **args
    )


def test_a_replan_waits_for_the_cooldown_a_rollout_and_capacity_not_yet_ready() -> None:
    doubled = ASSUMED.model_copy(update={"requests_per_second": 200, "attainment_percent": 99})
    assert _consider(doubled).workload is not None
    held = _consider(doubled, last_change=NOW - timedelta(seconds=100))
    assert held.workload is None and "cooldown for 200s more" in held.held
    assert "rollout" in _consider(doubled, rollout_in_progress=True).held
    # Low attainment while added instances are not Ready yet: their absence, not a reason to add more.
    starved = ASSUMED.model_copy(update={"attainment_percent": 60})
    assert "not Ready yet" in _consider(starved, pending={"prefill": 0, "decode": 2}).held
    assert _consider(starved).workload is not None
    # Rate drift is acted on even then: the new plan sizes from the rate, not from attainment.
    assert _consider(doubled, pending={"prefill": 0, "decode": 2}).workload is not None


def _plan(prefill: int, decode: int) -> PlanStatus:
    p, d = PhasePlan(tp=1, pp=1, replicas=prefill), PhasePlan(tp=1, pp=1, replicas=decode)
    return PlanStatus(
        prefill=p,
        decode=d,
        affinity="High",
        gpus=prefill + decode,
        summary="s",
        estimated=Estimate(goodput_per_gpu=1),
    )


def test_no_scale_down_while_a_role_has_instances_not_ready() -> None:
    current, smaller = _plan(2, 4), _plan(1, 3)
    kw = {"auto": AUTO, "workload": ASSUMED, "parallelism_hash": lambda p: "same"}
    held = scaling.adopt(current, smaller, pending={"prefill": 1, "decode": 0}, **kw)  # type: ignore[arg-type]
    assert (
        held.plan is None
        and "scale-down of prefill, decode held while prefill has 1 instance(s) not Ready" in held.message
    )
    done = scaling.adopt(current, smaller, pending={"prefill": 0, "decode": 0}, **kw)  # type: ignore[arg-type]
    assert done.plan is not None and drift.instances(done.plan) == {"prefill": 1, "decode": 3}
    # Both roles move together, and never below minReplicas.
    floor = AUTO.model_copy(update={"min_replicas": 2})
    kept = scaling.adopt(current, smaller, pending={}, **{**kw, "auto": floor})  # type: ignore[arg-type]
    assert kept.plan is not None and drift.instances(kept.plan) == {"prefill": 2, "decode": 3}
