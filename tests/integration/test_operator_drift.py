"""Re-planning by traffic: the real operator against the emulator, a real HTTP server playing the
router (Prometheus text), and the real planner. Intervals are the 5 s minimum the API allows."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.controllers import StatefulSetController
from operator_support.fake_prometheus import FakePrometheus
from operator_support.fake_router import FakeRouter, Traffic
from operator_support.harness import NS, OperatorEnv, eventually, operator_env
from operator_support.manifests import dsd
from operator_support.planners import plan_fn

from distserve_operator.api import WorkloadSnapshot, parse_spec

STS = "apps/v1/statefulsets"
RATE = 550.0
INTERVAL = 5


def _replicas(env: OperatorEnv, name: str) -> dict[str, int]:
    return {s["metadata"]["name"]: s["spec"]["replicas"] for s in env.children(STS, name)}


def _plan(env: OperatorEnv, name: str) -> dict[str, Any]:
    return env.status(name).get("plan") or {}


async def _started(env: OperatorEnv, router: FakeRouter, **spec: Any) -> dict[str, int]:
    await env.start_operator(router_metrics_url=router.url)
    await env.create(dsd("llm", **spec))
    await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
    return _replicas(env, "llm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_doubled_traffic_scales_up_within_two_intervals() -> None:
    port = _free_port()
    async with FakeRouter(Traffic(RATE)) as router, operator_env(plan_fn=plan_fn(), metrics_port=port) as env:
        before = await _started(env, router)
        first = _plan(env, "llm")
        router.set(Traffic(2 * RATE))
        scrapes = router.scrapes
        # Two intervals after the change (plus the first scrape's slack): replicas went up.
        await eventually(
            lambda: _replicas(env, "llm") != before,
            timeout=3 * INTERVAL + 10,
            what="replicas to change after doubled traffic",
        )
        assert router.scrapes - scrapes <= 3
        after = _replicas(env, "llm")
        assert sum(after.values()) > sum(before.values())
        status = await eventually(
            lambda: env.status("llm").get("lastReplan") and env.status("llm"), what="lastReplan"
        )
        assert status["lastReplan"]["reason"].startswith("RateDrift")
        assert abs(status["observed"]["requestsPerSecond"] - 2 * RATE) / (2 * RATE) < 0.15
        assert abs(status["assumptions"]["requestsPerSecond"] - 2 * RATE) / (2 * RATE) < 0.15
        # The applied plan is the planner's answer for the observed workload, with the running
        # shapes kept (scope Replicas: no pod restarts).
        spec = parse_spec(env.cr("llm")["spec"])
        expected = plan_fn()(
            spec, workload_override=WorkloadSnapshot.model_validate(status["assumptions"])
        ).status
        plan = _plan(env, "llm")
        for role in ("prefill", "decode"):
            assert (plan[role]["tp"], plan[role]["pp"]) == (first[role]["tp"], first[role]["pp"])
            if (getattr(expected, role).tp, getattr(expected, role).pp) == (
                first[role]["tp"],
                first[role]["pp"],
            ):
                assert plan[role]["replicas"] == getattr(expected, role).replicas
        assert any(e.get("reason") == "Replanned" for e in env.events())
        # What the dashboard shows: one applied re-plan (its annotation), the rate now planned for.
        async with env.session.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        key = f'deployment="llm",namespace="{NS}"'
        assert f'distserve_operator_plan_changes_total{{{key},reason="RateDrift"}} 1.0' in text
        planned = float(text.split(f"distserve_operator_planned_requests_per_second{{{key}}} ")[1].split()[0])
        assert abs(planned - 2 * RATE) / (2 * RATE) < 0.15


async def test_noise_within_ten_percent_changes_nothing() -> None:
    async with FakeRouter(Traffic(RATE)) as router, operator_env(plan_fn=plan_fn()) as env:
        before = await _started(env, router)
        for factor in (1.08, 0.92, 1.09, 0.91):
            router.set(Traffic(RATE * factor))
            seen = router.scrapes
            await eventually(
                lambda seen=seen: router.scrapes >= seen + 1, timeout=2 * INTERVAL + 5, what="a scrape"
            )
        await eventually(lambda: env.status("llm").get("observed"), what="an observation")
        drift = env.condition("llm", "PlanDrift")
        assert drift is not None and drift["status"] == "False", drift
        assert drift["reason"] == "WithinTolerance"
        assert _replicas(env, "llm") == before
        assert "lastReplan" not in env.status("llm")


async def test_lower_attainment_triggers_a_replan() -> None:
    async with FakeRouter(Traffic(RATE)) as router, operator_env(plan_fn=plan_fn()) as env:
        # Low attainment counts only once every planned instance is Ready (not while capacity is
        # still coming up): play the StatefulSet controller, pods Ready at once.
        ctl = StatefulSetController(env.api, env.url, env.session, NS, ready_seconds=0.0)
        async with ctl.running():
            await _attainment_replan(env, router)


async def _attainment_replan(env: OperatorEnv, router: FakeRouter) -> None:
    before = await _started(env, router)
    router.set(Traffic(RATE, attainment_percent=60.0))
    status = await eventually(
        lambda: env.status("llm").get("lastReplan") and env.status("llm"),
        timeout=3 * INTERVAL + 10,
        what="a re-plan",
    )
    assert status["lastReplan"]["reason"].startswith("AttainmentBelowTarget")
    assert status["assumptions"]["requestsPerSecond"] > RATE  # planned with headroom
    after = await eventually(
        lambda: _replicas(env, "llm") != before and _replicas(env, "llm"), what="more replicas"
    )
    assert sum(after.values()) > sum(before.values())
    degraded = await eventually(
        lambda: (
            (env.condition("llm", "Degraded") or {}).get("status") == "True"
            and env.condition("llm", "Degraded")
        ),
        what="Degraded=True",
    )
    assert "attainment" in degraded["message"]


async def test_external_mode_leaves_replicas_to_the_autoscaler() -> None:
    async with FakeRouter(Traffic(RATE)) as router, operator_env(plan_fn=plan_fn()) as env:
        before = await _started(env, router, autoscaling={"mode": "External", "intervalSeconds": 5})
        # An HPA scales a StatefulSet; the operator's resyncs must not undo it.
        name = next(iter(before))
        path = f"{env.url}/apis/apps/v1/namespaces/serving/statefulsets/{name}"
        async with env.session.patch(
            path,
            json={"spec": {"replicas": 7}},
            params={"fieldManager": "kube-controller-manager"},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as r:
            assert r.status < 400
        router.set(Traffic(2 * RATE))
        await eventually(
            lambda: env.status("llm").get("observed"), timeout=3 * INTERVAL + 10, what="an observation"
        )
        applies = env.api.count("PATCH", f"/statefulsets/{name}?")
        await eventually(
            lambda: env.api.count("PATCH", f"/statefulsets/{name}?") >= applies + 2, what="resyncs"
        )
        assert _replicas(env, "llm")[name] == 7
        # The autoscaler owns the field now, the operator everything it renders but the count.
        owners = env.api.managers("apps/v1/statefulsets", "serving", name)
        assert "spec.replicas" in owners["kube-controller-manager"]
        assert "spec.replicas" not in owners["distserve-operator"]
        assert any(
            p.startswith("spec.template.spec.containers.[name=") and p.endswith("].image")
            for p in owners["distserve-operator"]
        )
        roles = await eventually(
            lambda: [r for r in env.status("llm")["roles"] if r["replicas"] == 7], what="roles"
        )
        assert len(roles) == 1  # status reports the autoscaler's count
        assert "lastReplan" not in env.status("llm")
        assert (env.condition("llm", "PlanDrift") or {}).get("status") == "True"  # reported, not acted on


async def test_prometheus_source_rate_drift_scales_up() -> None:
    async with FakePrometheus(Traffic(RATE)) as prom, operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        metrics = {"source": "Prometheus", "prometheusURL": prom.url, "windowSeconds": 60}
        await env.create(
            dsd("llm", autoscaling={"intervalSeconds": 5, "cooldownSeconds": 5, "metrics": metrics})
        )
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        before = _replicas(env, "llm")
        # Prometheus answers at once (rate() over its window): the first observation already counts.
        await eventually(
            lambda: env.status("llm").get("observed"), timeout=2 * INTERVAL + 5, what="an observation"
        )
        assert any('namespace="serving",service="llm"' in q and "[60s]" in q for q in prom.queries)
        assert "lastReplan" not in env.status("llm")
        prom.traffic = Traffic(2 * RATE)
        after = await eventually(
            lambda: _replicas(env, "llm") != before and _replicas(env, "llm"),
            timeout=3 * INTERVAL + 10,
            what="replicas to change",
        )
        assert sum(after.values()) > sum(before.values())
