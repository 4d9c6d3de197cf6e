"""The operator's Prometheus metrics, on an explicit registry served at startup (never at import)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
            ["reason"],
            registry=self.registry,
        )
        self.plan_cache_total = Counter(
            "distserve_operator_plan_cache_lookups_total",
            "Plan lookups by result: hit (a finished plan reused), shared (joined an identical plan in "
            "progress), miss (the planner ran).",
            ["result"],
            registry=self.registry,
        )
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

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
