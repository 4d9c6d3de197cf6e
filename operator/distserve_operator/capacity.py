"""How many GPUs this deployment can actually get, and which of its pods wait for want of them (pure).

The planner's nominal budget is `spec.cluster` (nodes × gpusPerNode, or maxGPUs) capped by
`autoscaling.maxGPUs`. A real cluster may have fewer: other tenants hold some, nodes are cordoned,
a ResourceQuota caps the namespace. A plan larger than that leaves pods Pending for ever, so the
operator plans within what is allocatable:

- nodes that can run our workers (`cluster.nodeSelector`, not cordoned, taints tolerated): their
  `status.allocatable[<gpu resource>]` minus what pods that are not ours request on them;
- within every ResourceQuota of the namespace that caps `requests.<gpu resource>`: its `hard`
  minus what is `used` by pods that are not ours.

Our own pods' GPUs count as available to us: a re-plan may reuse them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import labels as L
from .api import GpuBudget
from .api.spec import Toleration

Obj = Mapping[str, Any]
DONE_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Allocatable:
    """GPUs this deployment can get. `nodes`/`quota` are None when the operator could not read them."""

    nodes: int | None  # free on eligible nodes (ours included)
    node_count: int
    quota: int | None  # room left under the tightest ResourceQuota (ours included)
    quota_name: str = ""

    @property
    def gpus(self) -> int | None:
        known = [v for v in (self.nodes, self.quota) if v is not None]
        return min(known) if known else None

    def describe(self, resource: str) -> str:
        parts = []
        if self.nodes is not None:
            parts.append(f"{self.nodes} free {resource} on {self.node_count} eligible node(s)")
        if self.quota is not None:
            parts.append(f"{self.quota} left under ResourceQuota {self.quota_name}")
        return "; ".join(parts) or "allocatable GPUs unknown"


def quantity(value: Any) -> int:
    """An integer resource quantity ("4", 4); extended resources such as GPUs are whole numbers."""
    try:
        return int(str(value).strip() or 0)
    except ValueError:
        try:
            return int(float(str(value)))
        except ValueError:
            return 0


def _is_ours(pod: Obj, instance: str) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(L.APP_INSTANCE) == instance and labels.get(L.APP_MANAGED_BY) == L.MANAGER_VALUE)


def pod_gpus(pod: Obj, resource: str) -> int:
    """GPUs a pod requests (sum over containers; init containers run before and are ignored)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        total += quantity((res.get("requests") or res.get("limits") or {}).get(resource, 0))
    return total


def _tolerates(taint: Obj, tolerations: Sequence[Toleration]) -> bool:
    if taint.get("effect") not in ("NoSchedule", "NoExecute"):
        return True  # PreferNoSchedule only steers
    for t in tolerations:
        if t.effect is not None and t.effect.value != taint.get("effect"):
            continue
        if t.operator.value == "Exists" and (t.key in (None, "", taint.get("key"))):
            return True
        if t.key == taint.get("key") and (t.value or "") == (taint.get("value") or ""):
            return True
    return False


def eligible(node: Obj, *, node_selector: Mapping[str, str], tolerations: Sequence[Toleration]) -> bool:
    meta, spec = node.get("metadata") or {}, node.get("spec") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in node_selector.items()):
        return False
    if spec.get("unschedulable"):
        return False
    return all(_tolerates(t, tolerations) for t in spec.get("taints") or [])


def allocatable(
    *,
    instance: str,
    resource: str,
    nodes: Sequence[Obj] | None,
    pods: Sequence[Obj] | None,
    quotas: Sequence[Obj] | None,
    node_selector: Mapping[str, str],
    tolerations: Sequence[Toleration],
) -> Allocatable:
    """What `instance` can get. `pods`: every pod the operator can see (all namespaces when it may);
    None for a list it could not read."""
    free_nodes: int | None = None
    count = 0
    if nodes is not None:
        names = {
            str((n.get("metadata") or {}).get("name"))
            for n in nodes
            if eligible(n, node_selector=node_selector, tolerations=tolerations)
        }
        count = len(names)
        used: dict[str, int] = {}
        for pod in pods or ():
            node = str((pod.get("spec") or {}).get("nodeName"))
            live = (pod.get("status") or {}).get("phase") not in DONE_PHASES
            if node in names and live and not _is_ours(pod, instance):
                used[node] = used.get(node, 0) + pod_gpus(pod, resource)
        free_nodes = 0
        for n in nodes:
            name = str((n.get("metadata") or {}).get("name"))
            if name in names:
                cap = quantity(((n.get("status") or {}).get("allocatable") or {}).get(resource, 0))
                free_nodes += max(0, cap - used.get(name, 0))
    free_quota: int | None = None
    quota_name = ""
    key = f"requests.{resource}"
    ours = sum(
        pod_gpus(p, resource)
        for p in pods or ()
        if _is_ours(p, instance) and (p.get("status") or {}).get("phase") not in DONE_PHASES
    )
    for q in quotas or ():
        hard = (q.get("spec") or {}).get("hard") or {}
        if key not in hard:
            continue
        used_q = quantity(((q.get("status") or {}).get("used") or {}).get(key, 0))
        room = max(0, quantity(hard[key]) - max(0, used_q - ours))
        if free_quota is None or room < free_quota:
            free_quota, quota_name = room, (q.get("metadata") or {}).get("name", "")
    return Allocatable(free_nodes, count, free_quota, quota_name)


@dataclass(frozen=True)
class Waiting:
    """This deployment's pods the scheduler cannot place."""

    pods: int
    gpus: int  # they request
    message: str  # the scheduler's word on one of them
    oldest: str | None  # RFC 3339 time the longest waiting one became unschedulable


def unschedulable(pods: Iterable[Obj], *, instance: str, resource: str) -> Waiting:
    """Our Pending pods whose PodScheduled condition says Unschedulable."""
    count = gpus = 0
    message = ""
    oldest: str | None = None
    for pod in pods:
        if not _is_ours(pod, instance) or (pod.get("status") or {}).get("phase") != "Pending":
            continue
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                count += 1
                gpus += pod_gpus(pod, resource)
                message = message or str(cond.get("message") or "")
                since = cond.get("lastTransitionTime")
                if since and (oldest is None or since < oldest):
                    oldest = since
                break
    return Waiting(count, gpus, message, oldest)


def budget(nominal: int, found: Allocatable | None, resource: str) -> GpuBudget:
    """The budget to plan within: the nominal one, or fewer when fewer are allocatable."""
    gpus = found.gpus if found is not None else None
    if gpus is None:
        return GpuBudget(
            nominal=nominal,
            allocatable=None,
            planned_within=nominal,
            message=(
                "planned within the nominal spec.cluster budget: "
                + (found.describe(resource) if found else "the operator cannot read nodes or quotas")
            ),
        )
    if gpus >= nominal:
        return GpuBudget(
            nominal=nominal,
            allocatable=gpus,
            planned_within=nominal,
            message=f"the nominal budget is allocatable ({found.describe(resource) if found else ''})",
        )
    return GpuBudget(
        nominal=nominal,
        allocatable=gpus,
        planned_within=gpus,
        message=(
            f"planned within {gpus} allocatable GPU(s), not the nominal {nominal}: "
            f"{found.describe(resource) if found else ''}"
        ),
    )
