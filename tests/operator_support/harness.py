"""Run the real operator (kopf, in-process) against the API-server emulator over real HTTP.

`async with operator_env() as env:` starts the emulator on a local port; `env.start_operator()`
runs `kopf.operator()` in a thread with our handlers registered on a fresh registry (standalone,
all namespaces) and waits until it is ready; `env.stop_operator()` stops it the way SIGTERM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import kopf
from kmock import Server

from distserve_operator.handlers import register
from distserve_operator.reconcile import PlanFn
from distserve_operator.settings import OperatorSettings

from .emulator import TEST_CLIENT, ApiServerEmulator

CR = "distserve.io/v1alpha1/distservedeployments"
NS = "serving"
X = TypeVar("X")


async def eventually(
    probe: Callable[[], X | None] | Callable[[], Awaitable[X | None]],
    *,
    timeout: float = 30.0,
    what: str = "",
) -> X:
    """Poll until `probe()` returns something truthy (no blind sleeps); fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or probe!r} (last: {last!r})")


@dataclass
class OperatorEnv:
    api: ApiServerEmulator
    url: str
    settings: OperatorSettings
    plan_fn: PlanFn | None
    session: aiohttp.ClientSession
    _thread: threading.Thread | None = None
    _stop: threading.Event | None = None
    errors: list[str] = field(default_factory=list)

    async def start_operator(self, **overrides: Any) -> None:
        """Run kopf in its own thread and event loop, as `kopf.testing.KopfRunner` does: kopf
        cancels every task of its loop on exit, which must not include the emulator's."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        registry = register(kopf.OperatorRegistry(), settings, plan_fn=self.plan_fn)
        ready, stop = threading.Event(), threading.Event()

        def run() -> None:
            kopf_settings = kopf.OperatorSettings()
            kopf_settings.watching.reconnect_backoff = 0.2
            try:
                asyncio.run(
                    kopf.operator(
                        registry=registry,
                        settings=kopf_settings,
                        standalone=True,
                        clusterwide=True,
                        ready_flag=ready,
                        stop_flag=stop,
                        memo=kopf.Memo(),
                    )
                )
            except BaseException as exc:
                self.errors.append("".join(traceback.format_exception(exc)))
                ready.set()

        self._stop = stop
        self._thread = threading.Thread(target=run, name="operator", daemon=True)
        self._thread.start()
        assert await asyncio.to_thread(ready.wait, 30), "the operator did not become ready"
        assert not self.errors, self.errors

    async def stop_operator(self) -> None:
        if self._thread is None or self._stop is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 60)
        assert not self._thread.is_alive(), "the operator did not stop"
        self._thread = None
        assert not self.errors, self.errors

    # ------------------------------------------------------------------ kubectl-like client

    def _path(self, namespace: str, name: str | None = None) -> str:
        base = f"{self.url}/apis/distserve.io/v1alpha1/namespaces/{namespace}/distservedeployments"
        return f"{base}/{name}" if name else base

    async def create(self, body: dict[str, Any], namespace: str = NS) -> dict[str, Any]:
        async with self.session.post(self._path(namespace), json=body) as resp:
            assert resp.status < 400, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]

    async def patch_spec(self, name: str, spec_patch: dict[str, Any], namespace: str = NS) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(
            self._path(namespace, name), json={"spec": spec_patch}, headers=headers
        ) as r:
            assert r.status < 400, await r.text()

    async def delete(self, name: str, namespace: str = NS) -> None:
        async with self.session.delete(self._path(namespace, name)) as resp:
            assert resp.status < 400, await resp.text()

    def cr(self, name: str, namespace: str = NS) -> dict[str, Any] | None:
        return self.api.fetch(CR, namespace, name)

    def status(self, name: str, namespace: str = NS) -> dict[str, Any]:
        obj = self.cr(name, namespace) or {}
        return obj.get("status") or {}

    def condition(self, name: str, type_: str, namespace: str = NS) -> dict[str, Any] | None:
        return next(
            (c for c in self.status(name, namespace).get("conditions", []) if c["type"] == type_), None
        )

    def children(self, key: str, name: str, namespace: str = NS) -> list[dict[str, Any]]:
        return [
            o
            for o in self.api.items(key, namespace)
            if (o.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/instance") == name
        ]

    def events(self, namespace: str = NS) -> list[dict[str, Any]]:
        return self.api.items("v1/events", namespace)


@contextlib.asynccontextmanager
async def operator_env(*, plan_fn: PlanFn | None = None, **settings: Any) -> AsyncIterator[OperatorEnv]:
    async with (
        ApiServerEmulator() as api,
        Server(api) as server,
        aiohttp.ClientSession(headers={"User-Agent": TEST_CLIENT}) as session,
    ):
        api.register_resources()
        url = str(server.url).rstrip("/")
        defaults: dict[str, Any] = {
            "api_server": url,
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
            "resync_seconds": 2.0,
            "observe_tick_seconds": 0.2,
            "planner_workers": 1,
            # No router by default: a closed local port answers at once.
            "router_metrics_url": "http://127.0.0.1:9/metrics",
        }
        env = OperatorEnv(
            api=api,
            url=url,
            settings=OperatorSettings(**{**defaults, **settings}),
            plan_fn=plan_fn,
            session=session,
        )
        try:
            yield env
        finally:
            await env.stop_operator()
