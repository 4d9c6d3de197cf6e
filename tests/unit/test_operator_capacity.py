"""GPUs a deployment can actually get, and its pods waiting for them (pure)."""

from __future__ import annotations

from typing import Any

from distserve_operator import capacity
from distserve_operator.api.spec import Toleration

GPU = "nvidia.com/gpu"
OURS = {"app.kubernetes.io/instance": "llm", "app.kubernetes.io/managed-by": "distserve-operator"}


def node(
    name: str,
    gpus: int,
    *,
    labels: dict[str, str] | None = None,
    taint: str | None = None,
    cordoned: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"unschedulable": cordoned}
    if taint:
        spec["taints"] = [{"key": taint, "effect": "NoSchedule"}]
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
        "status": {"allocatable": {GPU: str(gpus)}},
    }


def pod(
    gpus: int, node_name: str | None = None, *, ours: bool = False, phase: str = "Running"
) -> dict[str, Any]:
    return {
        "metadata": {"labels": OURS if ours else {}},
        "spec": {"nodeName": node_name, "containers": [{"resources": {"requests": {GPU: str(gpus)}}}]},
        "status": {"phase": phase},
    }


def _alloc(nodes, pods, quotas=None, *, selector=None, tolerations=()):  # type: ignore[no-untyped-def]
    return capacity.allocatable(
        instance="llm",
        resource=GPU,
        nodes=nodes,
        pods=pods,
        quotas=quotas,
        node_selector=selector or {},
        tolerations=list(tolerations),
    )


def test_free_gpus_are_eligible_nodes_minus_what_others_request() -> None:
    nodes = [
        node("a", 8),
        node("b", 8),
        node("cordoned", 8, cordoned=True),
        node("t4", 4, labels={"gpu": "t4"}),
    ]
    pods = [pod(6, "a"), pod(2, "b", ours=True), pod(8, "b", phase="Succeeded"), pod(4, None)]
    found = _alloc(nodes, pods, selector={})
    # a: 8-6, b: 8 (ours count as ours to reuse; a finished pod holds nothing), t4: 4.
    assert (found.nodes, found.node_count, found.gpus) == (14, 3, 14)
    assert _alloc(nodes, pods, selector={"gpu": "t4"}).gpus == 4


def test_taints_need_a_toleration() -> None:
    nodes = [node("a", 8, taint=GPU), node("b", 8)]
    assert _alloc(nodes, []).gpus == 8
    tolerate = Toleration(key=GPU, operator="Exists", effect="NoSchedule")
    assert _alloc(nodes, [], tolerations=[tolerate]).gpus == 16


def test_a_resource_quota_caps_what_is_left() -> None:
    quota = {
        "metadata": {"name": "team"},
        "spec": {"hard": {f"requests.{GPU}": "10"}},
        "status": {"used": {f"requests.{GPU}": "7"}},
    }
    # 7 used, 3 of them ours: 10 - 4 = 6 for us.
    found = _alloc([node("a", 16)], [pod(3, "a", ours=True)], [quota])
    assert (found.quota, found.quota_name, found.gpus) == (6, "team", 6)
    assert "6 left under ResourceQuota team" in found.describe(GPU)


def test_the_budget_is_the_nominal_one_unless_fewer_are_allocatable() -> None:
    few = _alloc([node("a", 8)], [pod(5, "a")])
    b = capacity.budget(16, few, GPU)
    assert (b.nominal, b.allocatable, b.planned_within) == (16, 3, 3)
    assert "planned within 3 allocatable GPU(s), not the nominal 16" in b.message
    assert capacity.budget(2, few, GPU).planned_within == 2
    unknown = capacity.budget(16, None, GPU)
    assert (unknown.allocatable, unknown.planned_within) == (None, 16)
    assert "cannot read nodes" in unknown.message


def test_pods_waiting_for_gpus_are_ours_and_unschedulable() -> None:
    waiting = pod(2, ours=True, phase="Pending")
    waiting["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes: Insufficient nvidia.com/gpu",
            "lastTransitionTime": "2026-01-01T00:00:05Z",
        }
    ]
    creating = pod(1, "a", ours=True, phase="Pending")  # scheduled, pulling its image
    other = {**waiting, "metadata": {"labels": {}}}
    w = capacity.unschedulable([waiting, creating, other], instance="llm", resource=GPU)
    assert (w.pods, w.gpus, w.oldest) == (1, 2, "2026-01-01T00:00:05Z")
    assert "Insufficient" in w.message
