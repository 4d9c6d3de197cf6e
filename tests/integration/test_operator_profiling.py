"""planner.profiling Auto on the real operator against the API-server emulator: the profiling Job's
lifecycle. No Job controller or kubelet runs here: the test plays them, setting the Job's status and
creating its pod with the termination message `distserve profile`'s command writes (a real profile)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.harness import NS, OperatorEnv, eventually, operator_env
from operator_support.manifests import dsd
from operator_support.planners import plan_fn

ROOT = Path(__file__).resolve().parents[2]
JOBS = "batch/v1/jobs"
OPT13 = {
    "model": {"name": "facebook/opt-13b", "dtype": "float16"},
    "workload": {"requestsPerSecond": "10", "inputTokens": {"mean": 512}, "outputTokens": {"mean": 128}},
    "cluster": {
        "gpu": {"type": "A100-80GB"},
        "gpusPerNode": 4,
        "nodeSelector": {"nvidia.com/gpu.product": "A100-SXM4-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "autoscaling": {"mode": "Off"},
}
AUTO = {"profiling": {"mode": "Auto"}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _write(env: OperatorEnv, method: str, path: str, body: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
    async with env.session.request(method, f"{env.url}{path}", json=body, headers=headers) as r:
        assert r.status < 400, await r.text()


async def _finish(env: OperatorEnv, job: dict[str, Any], *, ok: bool, message: str) -> None:
    """What the Job controller and the kubelet would do: the pod ends, the Job records it."""
    name, labels = job["metadata"]["name"], job["spec"]["template"]["metadata"]["labels"]
    pods = f"/api/v1/namespaces/{NS}/pods"
    await _write(env, "POST", pods, {"metadata": {"name": f"{name}-x1", "labels": labels}, "spec": {}})
    terminated = {"exitCode": 0 if ok else 2, "reason": "Completed" if ok else "Error", "message": message}
    pod_status = {
        "phase": "Succeeded" if ok else "Failed",
        "containerStatuses": [{"name": "profile", "state": {"terminated": terminated}}],
    }
    await _write(env, "PATCH", f"{pods}/{name}-x1/status", {"status": pod_status})
    kind, cond = ("Complete", {}) if ok else ("Failed", {"reason": "BackoffLimitExceeded"})
    status = {
        "succeeded" if ok else "failed": 1,
        "conditions": [{"type": kind, "status": "True", "lastTransitionTime": _now(), **cond}],
    }
    await _write(env, "PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status", {"status": status})


async def test_profiling_job_lifecycle_retry_store_and_reuse() -> None:
    async with operator_env(plan_fn=plan_fn(), resync_seconds=0.5, profile_backoff_seconds=3.0) as env:
        await env.start_operator()
        # Two deployments of one model, GPU type and dtype share one Job; Off runs none.
        await env.create(dsd("a", **OPT13, planner=AUTO))
        await env.create(dsd("a2", **OPT13, planner=AUTO))
        await env.create(dsd("off", **OPT13))
        (job,) = await eventually(lambda: env.api.items(JOBS, NS), what="the profiling Job")
        name = job["metadata"]["name"]
        assert name.endswith("-1") and "ownerReferences" not in job["metadata"]
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert c["image"] == env.cr("a")["spec"].get("worker", {}).get("image", c["image"])
        # Every TP size the search considers on a node (gpusPerNode 4), on the largest's GPUs.
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert c["command"][c["command"].index("--tp") + 1] == "1,2,3,4"
        assert c["command"][c["command"].index("--model-name") + 1] == "facebook/opt-13b"
        assert c["command"][c["command"].index("--dtype") + 1] == "float16"
        for deployment in ("a", "a2"):
            cond = await eventually(lambda d=deployment: env.condition(d, "Profiled"), what="Profiled")
            assert (cond["status"], cond["reason"]) == ("False", "Pending") and name in cond["message"]
            plan = await eventually(
                lambda d=deployment: env.status(d).get("plan"), what="the analytical plan"
            )
            assert plan["profile"].startswith("analytical")
        await eventually(lambda: env.status("off").get("plan"), what="the Off deployment's plan")
        assert env.condition("off", "Profiled") is None and len(env.api.items(JOBS, NS)) == 1

        # The Job is running; then it fails: the pod's log tail is the message, the plan stays.
        await _write(
            env,
            "PATCH",
            f"/apis/batch/v1/namespaces/{NS}/jobs/{name}/status",
            {"status": {"active": 1, "ready": 1}},
        )
        await eventually(
            lambda: (env.condition("a", "Profiled") or {}).get("reason") == "Running", what="Running"
        )
        await _finish(env, job, ok=False, message="cannot profile: CUDA out of memory")
        cond = await eventually(
            lambda: (c := env.condition("a", "Profiled")) and c["reason"] == "Failed" and c, what="Failed"
        )
        assert f"profiling Job {name} failed (attempt 1)" in cond["message"]
        assert "BackoffLimitExceeded" in cond["message"] and "CUDA out of memory" in cond["message"]
        assert "attempt 2 at" in cond["message"] and "analytical" in cond["message"]
        assert env.condition("a", "Planned")["status"] == "True"
        warned = await eventually(
            lambda: [e for e in env.events() if e.get("reason") == "ProfilingFailed"], what="a Warning Event"
        )
        assert warned[0]["type"] == "Warning" and "CUDA out of memory" in warned[0]["message"]
        assert env.status("a")["plan"]["profile"].startswith("analytical")

        # After the backoff: attempt 2 replaces it.
        (retry,) = await eventually(
            lambda: [j for j in env.api.items(JOBS, NS) if j["metadata"]["name"].endswith("-2")] or None,
            what="the retry Job",
        )
        await eventually(lambda: len(env.api.items(JOBS, NS)) == 1, what="the failed Job deleted")
        cond = await eventually(
            lambda: (c := env.condition("a2", "Profiled")) and c["reason"] == "Pending" and c,
            what="Profiled on attempt 2",
        )
        assert (
            "(attempt 2)" in cond["message"] and "CUDA out of memory" in cond["message"]
        )  # the last failure

        # It succeeds with a real profile (the bundled OPT-13B one, compacted as the command writes it).
        text = json.dumps(
            json.loads((ROOT / "deploy/profiles/opt-13b-a100-80gb-distserve.json").read_text()),
            separators=(",", ":"),
        )
        assert len(text) <= 4096
        await _finish(env, retry, ok=True, message=text)
        for deployment in ("a", "a2"):
            cond = await eventually(
                lambda d=deployment: (c := env.condition(d, "Profiled")) and c["status"] == "True" and c,
                what="Profiled=True",
            )
            assert cond["reason"] == "Succeeded"
            (cm,) = [
                m for m in env.api.items("v1/configmaps", NS) if m["metadata"]["name"] in cond["message"]
            ]
            stored = f"ConfigMap {NS}/{cm['metadata']['name']}"
            assert cm["metadata"]["annotations"]["distserve.io/profile-model"] == "facebook/opt-13b"
            assert "ownerReferences" not in cm["metadata"]
            plan = await eventually(
                lambda d=deployment, s=stored: (p := env.status(d)["plan"])["profile"].startswith(s) and p,
                what="the re-plan with the measured profile",
            )
            assert "DistServe profiler" in plan["profile"]
        await eventually(lambda: env.api.items(JOBS, NS) == [], what="the done Job deleted")

        # A later deployment of the same model, GPU type and dtype plans with it at once: no Job.
        await env.create(dsd("b", **OPT13, planner=AUTO))
        plan = await eventually(lambda: env.status("b").get("plan"), what="b's plan")
        assert plan["profile"].startswith(stored)
        assert env.condition("b", "Profiled")["reason"] == "Succeeded" and env.api.items(JOBS, NS) == []
        await eventually(lambda: env.condition("b", "Ready"), what="b's children applied")
        assert env.children("apps/v1/statefulsets", "b")
