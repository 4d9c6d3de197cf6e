"""Plans that can be scheduled: the real operator against the emulator with nodes, other tenants'
pods and a ResourceQuota; the planner plans within the GPUs the cluster can allocate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.harness import NS, OperatorEnv, eventually, operator_env
from operator_support.manifests import dsd
from operator_support.planners import plan_fn

GPU = "nvidia.com/gpu"
PRODUCT = {"nvidia.com/gpu.product": "A100-SXM4-80GB"}
# 3000 req/s wants 15 A100s (5 prefill + 10 decode) when nothing limits it.
BUSY = {"requestsPerSecond": "3000", "inputTokens": {"mean": 512}, "outputTokens": {"mean": 128}}
TWO_NODES = {
    "gpu": {"type": "A100-80GB"},
    "gpusPerNode": 8,
    "nodes": 2,
    "nodeSelector": PRODUCT,
    "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
}


async def _post(
    env: OperatorEnv, path: str, body: dict[str, Any], status: dict[str, Any] | None = None
) -> None:
    async with env.session.post(env.url + path, json=body) as r:
        assert r.status < 400, await r.text()
    if status is not None:
        name = body["metadata"]["name"]
        async with env.session.patch(
            f"{env.url}{path}/{name}/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            assert r.status < 400, await r.text()


async def _node(env: OperatorEnv, name: str, gpus: int, labels: dict[str, str] = PRODUCT) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": [{"key": GPU, "effect": "NoSchedule"}]},
    }
    await _post(env, "/api/v1/nodes", body, {"allocatable": {GPU: str(gpus), "cpu": "96"}})


async def _pod(
    env: OperatorEnv,
    name: str,
    namespace: str,
    gpus: int,
    *,
    node: str | None = None,
    labels: dict[str, str] | None = None,
    pending: bool = False,
) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": "other-tenant"}},
        "spec": {
            **({"nodeName": node} if node else {}),
            "containers": [
                {
                    "name": "c",
                    "image": "x",
                    "resources": {"requests": {GPU: str(gpus)}, "limits": {GPU: str(gpus)}},
                }
            ],
        },
    }
    status: dict[str, Any] = {"phase": "Running"}
    if pending:
        status = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": f"0/2 nodes are available: 2 Insufficient {GPU}.",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    await _post(env, f"/api/v1/namespaces/{namespace}/pods", body, status)


async def test_the_plan_fits_what_nodes_and_quota_leave() -> None:
    async with operator_env(plan_fn=plan_fn(), unschedulable_grace_seconds=0) as env:
        await _node(env, "gpu-a", 8)
        await _node(env, "gpu-b", 8)
        await _node(env, "elsewhere", 8, {"nvidia.com/gpu.product": "T4"})  # not what the spec selects
        await _pod(env, "tenant-1", "other", 7, node="gpu-a")  # another team holds 7 of gpu-a's 8
        await env.start_operator()
        await env.create(dsd("llm", workload=BUSY, cluster=TWO_NODES))
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="a plan")
        plan = status["plan"]
        assert plan["gpus"] <= 9 < 15
        budget = plan["gpuBudget"]
        assert (budget["nominal"], budget["allocatable"], budget["plannedWithin"]) == (16, 9, 9)
        assert "9 free nvidia.com/gpu on 2 eligible node(s)" in budget["message"]
        planned = env.condition("llm", "Planned")
        assert (
            planned is not None
            and "planned within 9 allocatable GPU(s), not the nominal 16" in planned["message"]
        )

    async with operator_env(plan_fn=plan_fn(), unschedulable_grace_seconds=0) as env:
        await _node(env, "gpu-a", 8)
        await _node(env, "gpu-b", 8)
        quota = {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "gpus"},
            "spec": {"hard": {f"requests.{GPU}": "4"}},
        }
        await _post(
            env,
            f"/api/v1/namespaces/{NS}/resourcequotas",
            quota,
            {"hard": {f"requests.{GPU}": "4"}, "used": {f"requests.{GPU}": "0"}},
        )
        await env.start_operator()
        await env.create(dsd("llm", workload=BUSY, cluster=TWO_NODES))
        status = await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="a plan")
        assert status["plan"]["gpus"] <= 4
        assert "ResourceQuota gpus" in status["plan"]["gpuBudget"]["message"]


async def test_pods_pending_for_gpus_say_so_and_the_plan_shrinks_to_what_fits() -> None:
    async with operator_env(plan_fn=plan_fn(), unschedulable_grace_seconds=0, resync_seconds=0.5) as env:
        await _node(env, "gpu-a", 8)
        await _node(env, "gpu-b", 8)
        await env.start_operator()
        await env.create(dsd("llm", workload=BUSY, cluster=TWO_NODES))
        first = (
            await eventually(lambda: env.condition("llm", "Ready") and env.status("llm"), what="a plan")
        )["plan"]
        assert first["gpus"] == 15
        # Another tenant takes 12 GPUs before our pods are placed; one of ours stays Pending.
        await _pod(env, "tenant-a", "other", 8, node="gpu-a")
        await _pod(env, "tenant-b", "other", 4, node="gpu-b")
        sts = next(
            s for s in env.children("apps/v1/statefulsets", "llm") if "-decode-" in s["metadata"]["name"]
        )
        labels = sts["spec"]["template"]["metadata"]["labels"]
        await _pod(env, f"{sts['metadata']['name']}-9", NS, 1, labels=labels, pending=True)

        cond = await eventually(
            lambda: (c := env.condition("llm", "Schedulable")) and c["status"] == "False" and c,
            what="Schedulable=False",
        )
        assert cond["reason"] == "InsufficientGPUs"
        assert (
            "1 worker pod(s) Pending" in cond["message"] and "Insufficient nvidia.com/gpu" in cond["message"]
        )
        assert "4 are allocatable" in cond["message"]  # the counts: wanted and schedulable
        plan = (
            await eventually(
                lambda: (env.status("llm").get("plan") or {}).get("gpus", 99) <= 4 and env.status("llm"),
                what="a plan within the 4 allocatable GPUs",
            )
        )["plan"]
        assert plan["gpuBudget"]["allocatable"] == 4
        planned = env.condition("llm", "Planned")
        assert planned is not None and planned["reason"] == "Replanned"
        # Events are posted in the background (kopf's queue): they may trail the status.
        await eventually(
            lambda: any(
                e.get("reason") == "Replanned" and "allocatable" in e.get("message", "") for e in env.events()
            ),
            what="a Replanned Event saying what is allocatable",
        )
