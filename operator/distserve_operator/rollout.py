"""Staged re-plans: when a plan changes the shape of its pods (tp, pp, stage split, placement), the
new instance groups come up beside the old ones, and the old ones go only once the new ones serve.

Pure: it reads the live StatefulSets (as `Group`s) and says what to do next. A revision is the
shape's hash (children.revision); every worker object carries it in a label and its name. Each
reconcile takes one step, so an operator restart resumes where the objects are:

1. StartingNew: the new groups are applied with their full replicas; the old ones keep serving
   (the role Services select stage-0 pods of every revision, so the router sees both).
2. When every role of the new revision has all its instances Ready, the old groups are scaled to
   zero: their pods get SIGTERM and drain (they stop taking work, finish what they hold).
   An old revision that serves nothing (no ready instance in any role) goes at once.
3. When no pod of an old revision is left, its objects are deleted.

So no role ever loses its last ready instance to a rollout. One exception keeps a rollout from
deadlocking on a full cluster: while new pods cannot be scheduled (`make_room`), an old role with
a ready instance to spare (the role keeps at least one ready elsewhere) gives one up per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import labels as L
from .api import RoleRollout

ROLES = (L.ROLE_PREFILL, L.ROLE_DECODE)
LEGACY = ""  # groups made before revisions existed


class StepName:
    STARTING_NEW = "StartingNew"
    MAKING_ROOM = "MakingRoom"
    DRAINING_OLD = "DrainingOld"
    REMOVING_OLD = "RemovingOld"


@dataclass(frozen=True)
class Group:
    """One live worker StatefulSet: a pipeline stage of one revision, serving one or both roles."""

    name: str
    revision: str
    roles: frozenset[str]
    stage: int
    desired: int  # spec.replicas
    pods: int  # status.replicas: pods that exist, draining ones included
    ready: int  # status.readyReplicas


def group_of(obj: Mapping[str, Any]) -> Group:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    roles = {
        r
        for r, key in ((L.ROLE_PREFILL, L.SERVES_PREFILL), (L.ROLE_DECODE, L.SERVES_DECODE))
        if labels.get(key)
    }
    if not roles and labels.get(L.ROLE) in ROLES:
        roles = {labels[L.ROLE]}
    status = obj.get("status") or {}
    stage = str(labels.get(L.STAGE, "0"))
    return Group(
        name=meta.get("name", ""),
        revision=labels.get(L.REVISION, LEGACY),
        roles=frozenset(roles),
        stage=int(stage) if stage.isdigit() else 0,
        desired=int((obj.get("spec") or {}).get("replicas") or 0),
        pods=int(status.get("replicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
    )


def ready_instances(groups: Iterable[Group], revision: str, role: str) -> int:
    """Instances of `role` in `revision` that serve: instance k needs every stage's pod k, so the
    count is the least ready stage (0 when the revision has no group for the role)."""
    counts = [g.ready for g in groups if g.revision == revision and role in g.roles]
    return min(counts) if counts else 0


@dataclass(frozen=True)
class Step:
    """What to do now. `scale`: old StatefulSet -> replicas; `remove`: revisions whose objects go."""

    step: str | None  # None: no rollout in progress
    scale: dict[str, int] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    old_revisions: tuple[str, ...] = ()
    roles: list[RoleRollout] = field(default_factory=list)
    message: str = ""

    @property
    def in_progress(self) -> bool:
        return self.step is not None


def older(groups: Iterable[Group], revision: str) -> list[str]:
    """Revisions other than `revision` that still have groups: a rollout is in progress."""
    return sorted({g.revision for g in groups if g.revision != revision})


def step(
    groups: Sequence[Group], new_revision: str, new_desired: Mapping[str, int], *, make_room: bool = False
) -> Step:
    """The next step of the rollout to `new_revision` (whose roles want `new_desired` instances)."""
    old = older(groups, new_revision)
    if not old:
        return Step(None)
    new_ready = {r: ready_instances(groups, new_revision, r) for r in ROLES}
    wanted = {r: int(new_desired.get(r, 0)) for r in ROLES}
    new_complete = all(new_ready[r] >= wanted[r] for r in ROLES)
    old_ready = {r: sum(ready_instances(groups, rev, r) for rev in old) for r in ROLES}
    roles = [
        RoleRollout(name=r, old_ready=old_ready[r], new_ready=new_ready[r], new_desired=wanted[r])
        for r in ROLES
    ]

    scale: dict[str, int] = {}
    remove: list[str] = []
    names: list[str] = []
    for rev in old:
        mine = [g for g in groups if g.revision == rev]
        if all(g.desired == 0 and g.pods == 0 for g in mine):
            remove.append(rev)
            names.append(StepName.REMOVING_OLD)
            continue
        serving = {r: ready_instances(groups, rev, r) for r in ROLES}
        if new_complete or not any(serving.values()):
            scale.update({g.name: 0 for g in mine if g.desired})
            names.append(StepName.DRAINING_OLD)
            continue
        if make_room:
            give = _one_to_spare(groups, rev, mine)
            if give:
                scale.update(give)
                names.append(StepName.MAKING_ROOM)
                continue
        names.append(StepName.STARTING_NEW)
    # The least advanced revision names the step (StartingNew before MakingRoom before DrainingOld...).
    order = [StepName.STARTING_NEW, StepName.MAKING_ROOM, StepName.DRAINING_OLD, StepName.REMOVING_OLD]
    name = min(names, key=order.index)
    progress = ", ".join(f"{r.name} {r.new_ready}/{r.new_desired} (old {r.old_ready})" for r in roles)
    messages = {
        StepName.STARTING_NEW: f"new groups coming up beside the old ones; ready instances: {progress}",
        StepName.MAKING_ROOM: (
            f"new pods cannot be scheduled: an old instance with a ready one to spare drains to free its GPUs; {progress}"
        ),
        StepName.DRAINING_OLD: f"new groups ready; old groups draining (finishing their requests): {progress}",
        StepName.REMOVING_OLD: "old groups drained; removing them",
    }
    return Step(name, scale, tuple(remove), tuple(old), roles, messages[name])


def _one_to_spare(groups: Sequence[Group], rev: str, mine: Sequence[Group]) -> dict[str, int]:
    """Scale the old revision's groups of one role down by one instance, when every role those
    groups serve keeps at least one ready instance somewhere."""
    for role in ROLES:
        if ready_instances(groups, rev, role) == 0:
            continue
        targets = [g for g in mine if role in g.roles and g.desired > 0]
        if not targets:
            continue
        affected = set().union(*(g.roles for g in targets))
        revisions = {g.revision for g in groups}
        if all(sum(ready_instances(groups, r, x) for r in revisions) - 1 >= 1 for x in affected):
            return {g.name: g.desired - 1 for g in targets}
    return {}
