"""Play the kube-controller-manager and the kubelet for StatefulSets (and Deployments) in the emulator.

Each StatefulSet's pods exist as soon as its `spec.replicas` asks for them, turn Ready
`ready_seconds` later, and, when scaled down, stop being Ready at once (a draining worker's
readiness goes false) and are gone `drain_seconds` later (it finished what it held). The counts
are written to `status.replicas` / `status.readyReplicas` through the API, as the controller does.
`history` records, at every tick, the ready instances of each role summed over every revision:
what the router could pick at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .emulator import ApiServerEmulator

STS = "apps/v1/statefulsets"
DEPLOYMENTS = "apps/v1/deployments"
ROLES = ("prefill", "decode")


@dataclass
class _Pods:
    started: dict[int, float] = field(default_factory=dict)  # ordinal -> created at
    leaving: dict[int, float] = field(default_factory=dict)  # ordinal -> SIGTERM at


@dataclass
class StatefulSetController:
    api: ApiServerEmulator
    url: str
    session: aiohttp.ClientSession
    namespace: str
    ready_seconds: float = 1.0
    drain_seconds: float = 0.5
    tick_seconds: float = 0.05
    pods: dict[str, _Pods] = field(default_factory=dict)
    history: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    async def tick(self) -> None:
        now = time.monotonic()
        for key, sts in [(k, o) for k in (STS, DEPLOYMENTS) for o in self.api.items(k, self.namespace)]:
            name = f"{key}/{sts['metadata']['name']}"
            want = int(sts["spec"].get("replicas") or 0)
            pods = self.pods.setdefault(name, _Pods())
            for k in range(want):
                if k not in pods.started:
                    pods.leaving.pop(k, None)
                    pods.started[k] = now
            for k in [k for k in pods.started if k >= want]:
                del pods.started[k]
                pods.leaving[k] = now
            for k in [k for k, t in pods.leaving.items() if now - t >= self.drain_seconds]:
                del pods.leaving[k]
            ready = sum(1 for t in pods.started.values() if now - t >= self.ready_seconds)
            status = {"replicas": len(pods.started) + len(pods.leaving), "readyReplicas": ready}
            live = sts.get("status") or {}
            if any(int(live.get(k) or 0) != v for k, v in status.items()):
                plural = key.rsplit("/", 1)[1]
                path = f"{self.url}/apis/apps/v1/namespaces/{self.namespace}/{plural}/{sts['metadata']['name']}/status"
                async with self.session.patch(
                    path, json={"status": status}, headers={"Content-Type": "application/merge-patch+json"}
                ) as r:
                    if r.status == 404:
                        self.pods.pop(name, None)  # deleted meanwhile
        self.history.append((now, self.ready_instances()))

    def ready_instances(self) -> dict[str, int]:
        """Per role, instances whose every stage pod is Ready, summed over revisions."""
        by_revision: dict[tuple[str, str], list[int]] = {}
        for sts in self.api.items(STS, self.namespace):
            labels = sts["metadata"].get("labels") or {}
            ready = int((sts.get("status") or {}).get("readyReplicas") or 0)
            for role in ROLES:
                if labels.get(f"distserve.io/serves-{role}"):
                    by_revision.setdefault((role, labels.get("distserve.io/revision", "")), []).append(ready)
        out = dict.fromkeys(ROLES, 0)
        for (role, _), stages in by_revision.items():
            out[role] += min(stages)
        return out

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StatefulSetController]:
        async def loop() -> None:
            while True:
                await self.tick()
                await asyncio.sleep(self.tick_seconds)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def names(api: ApiServerEmulator, namespace: str, instance: str) -> dict[str, Any]:
    """StatefulSet name -> its revision label, for one deployment."""
    return {
        s["metadata"]["name"]: (s["metadata"].get("labels") or {}).get("distserve.io/revision")
        for s in api.items(STS, namespace)
        if (s["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == instance
    }
