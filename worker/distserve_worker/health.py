"""The small HTTP side of a worker: /healthz (alive), /readyz (model loaded, serving), /metrics,
and /forwards (the recent forwards' shapes and times, JSON; `distserve profile --in-stack`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import web


class Exposed(Protocol):
    def exposition(self) -> bytes: ...

    def forwards(self) -> object: ...


async def start_http(
    host: str,
    port: int,
    metrics: Exposed,
    ready: Callable[[], bool],
    broken: Callable[[], str | None] = lambda: None,
) -> web.AppRunner:
    """`broken` says why the process can no longer serve (a tensor-parallel rank died): /healthz
    then fails too, so the kubelet restarts the pod with all its ranks."""

    async def healthz(_: web.Request) -> web.Response:
        reason = broken()
        if reason:
            return web.json_response({"status": "broken", "reason": reason}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics_handler(_: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    async def forwards(_: web.Request) -> web.Response:
        return web.json_response(metrics.forwards())

    app = web.Application()
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics_handler),
            web.get("/forwards", forwards),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
