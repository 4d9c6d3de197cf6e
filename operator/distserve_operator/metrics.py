"""The operator's Prometheus metrics, on an explicit registry served at startup (never at import).

Per-deployment series carry `namespace` and `deployment` (the DistServeDeployment's name): the
Grafana dashboard (charts/distserve/dashboards) joins them with the routers' and workers' series,
which get the same two labels at scrape time (the chart's PodMonitor). Scrape the operator with
`honorLabels: true` so its `namespace` label is the deployment's, not the operator pod's.
"""

from __future__ import annotations

import re

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .api import DistServeDeploymentStatus, Slo

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DEPLOYMENT_LABELS = ("namespace", "deployment")
# status.roles names: `<role>-s<stage>` per worker stage, `router` for the router.
_STAGE_SUFFIX = re.compile(r"^(?P<role>.+)-s(?P<stage>\d+)$")


def role_and_stage(status_name: str) -> tuple[str, str]:
    """`prefill-s1` -> (prefill, 1); a name without a stage (router) is stage 0."""
    match = _STAGE_SUFFIX.match(status_name)
    return (match["role"], match["stage"]) if match else (status_name, "0")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.reconcile_seconds = Histogram(
            "distserve_operator_reconcile_seconds",
            "Time one reconcile of a DistServeDeployment took.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.plan_seconds = Histogram(
            "distserve_operator_plan_seconds",
            "Planner wall time per plan or re-plan.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.replans_total = Counter(
            "distserve_operator_replans_total",
            "Plans made for a deployment (computed or reused from an identical input), by reason (Created, RateDrift, ...).",
            [*DEPLOYMENT_LABELS, "reason"],
            registry=self.registry,
        )
        self.plan_changes_total = Counter(
            "distserve_operator_plan_changes_total",
            "Plans adopted and applied to a deployment, by reason: each first plan, spec change and "
            "re-plan on traffic that changed its replicas or shapes (the dashboard's re-plan annotations).",
            [*DEPLOYMENT_LABELS, "reason"],
            registry=self.registry,
        )
        self.plan_cache_total = Counter(
            "distserve_operator_plan_cache_lookups_total",
            "Plan lookups by result: hit (a finished plan reused), shared (joined an identical plan in "
            "progress), miss (the planner ran).",
            ["result"],
            registry=self.registry,
        )

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, [*DEPLOYMENT_LABELS, *extra], registry=self.registry)

        # What the deployment was planned for (spec.slo, status.assumptions, status.plan): the
        # lines the dashboard draws the observed series against.
        self.slo_ttft = gauge(
            "distserve_operator_slo_ttft_target_seconds", "TTFT target (spec.slo.ttftMillis)."
        )
        self.slo_tpot = gauge(
            "distserve_operator_slo_tpot_target_seconds", "TPOT target (spec.slo.tpotMillis)."
        )
        self.slo_attainment = gauge(
            "distserve_operator_slo_attainment_target_ratio",
            "Share of requests that must meet both SLOs (spec.slo.attainmentPercent / 100).",
        )
        self.planned_rate = gauge(
            "distserve_operator_planned_requests_per_second",
            "Request rate the current plan was sized for (status.assumptions.requestsPerSecond).",
        )
        self.planned_goodput = gauge(
            "distserve_operator_planned_goodput_requests_per_second",
            "Requests/s the current plan is predicted to serve within the SLO (status.plan.estimated.goodput).",
        )
        self.replicas = gauge(
            "distserve_operator_replicas",
            "Desired replicas per role and pipeline stage (status.roles).",
            "role",
            "stage",
        )
        self.ready_replicas = gauge(
            "distserve_operator_ready_replicas",
            "Ready replicas per role and pipeline stage (status.roles).",
            "role",
            "stage",
        )
        self._per_deployment = (
            self.slo_ttft,
            self.slo_tpot,
            self.slo_attainment,
            self.planned_rate,
            self.planned_goodput,
        )
        # (namespace, name) -> the (role, stage) pairs its replica gauges have now.
        self._roles: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def replanned(self, namespace: str, name: str, reason: str) -> None:
        self.replans_total.labels(namespace=namespace, deployment=name, reason=reason).inc()

    def plan_changed(self, namespace: str, name: str, reason: str) -> None:
        self.plan_changes_total.labels(namespace=namespace, deployment=name, reason=reason).inc()

    def record(self, namespace: str, name: str, slo: Slo, status: DistServeDeploymentStatus) -> None:
        """Set one deployment's gauges from its spec.slo and the status just written."""
        key = {"namespace": namespace, "deployment": name}
        self.slo_ttft.labels(**key).set(slo.ttft_millis / 1000)
        self.slo_tpot.labels(**key).set(slo.tpot_millis / 1000)
        self.slo_attainment.labels(**key).set(slo.attainment_percent / 100)
        if status.assumptions is not None:
            self.planned_rate.labels(**key).set(status.assumptions.requests_per_second)
        plan = status.plan
        if plan is not None:
            goodput = plan.estimated.goodput
            if goodput is None:  # older plans: per GPU only
                goodput = plan.estimated.goodput_per_gpu * plan.gpus
            self.planned_goodput.labels(**key).set(goodput)
        roles = {role_and_stage(r.name): r for r in status.roles}
        # Roles a new plan dropped (a stage, the colocated role) must not keep their last count.
        for role_name, stage in self._roles.get((namespace, name), set()) - set(roles):
            self.replicas.remove(namespace, name, role_name, stage)
            self.ready_replicas.remove(namespace, name, role_name, stage)
        for (role_name, stage), role in roles.items():
            self.replicas.labels(**key, role=role_name, stage=stage).set(role.replicas)
            self.ready_replicas.labels(**key, role=role_name, stage=stage).set(role.ready_replicas)
        self._roles[(namespace, name)] = set(roles)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted deployment's gauges (its re-plan counts stay: counters are history)."""
        for gauge in self._per_deployment:
            gauge.remove(namespace, name)  # a no-op when never set
        for role_name, stage in self._roles.pop((namespace, name), set()):
            self.replicas.remove(namespace, name, role_name, stage)
            self.ready_replicas.remove(namespace, name, role_name, stage)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def start(self, host: str, port: int) -> int:
        """Serve /metrics; returns the bound port (0 picks a free one)."""

        async def handle(_: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
