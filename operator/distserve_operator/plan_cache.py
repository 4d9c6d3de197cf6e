"""Each distinct planning input is planned once: a digest of what the planner reads, an LRU of
finished plans, and single-flight for plans in progress (100 identical deployments created at once
share one planner run). Pure asyncio: no kopf, no Kubernetes.

The key is a SHA-256 of canonical JSON: the spec minus the fields the planner never reads (see
`NOT_PLANNING`), plus the keyword arguments the planner gets (overrides, the profile). A file given
as `profile`, `trace` or `colocated_profile` is keyed by its content, so a changed profile
ConfigMap misses the cache; a string naming no file (a bundled profile's name) is keyed as written.
Names, namespaces, labels and status are not in the spec, so they never reach the key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

# Spec fields (python names) that `distserve_planner.loaders.spec.plan_input` does not read: a section
# name maps to None (the whole section) or to the sub-fields to drop. A deny list, not an allow
# list: a field the planner learns to read later misses the cache instead of serving a stale plan.
NOT_PLANNING: dict[str, frozenset[str] | None] = {
    "worker": None,
    "router": None,
    # Only autoscaling.maxGPUs reaches the planner (a pin's GPU budget); the rest acts after it.
    "autoscaling": frozenset(
        {"mode", "interval_seconds", "drift_percent", "cooldown_seconds", "scope", "metrics", "min_replicas"}
    ),
    "cluster": frozenset({"node_selector", "tolerations"}),
    "placement": frozenset({"gang_scheduling", "stage_layout"}),
}
# Keyword arguments naming files the planner reads: keyed by the file's content.
FILE_ARGUMENTS = frozenset({"profile", "trace", "colocated_profile"})


def planning_fields(spec: BaseModel) -> dict[str, Any]:
    """The part of a DistServeDeploymentSpec the planner reads, as JSON values."""
    doc = spec.model_dump(mode="json")
    for section, fields in NOT_PLANNING.items():
        if fields is None:
            doc.pop(section, None)
        elif isinstance(doc.get(section), dict):
            doc[section] = {k: v for k, v in doc[section].items() if k not in fields}
    return doc


def planning_key(spec: BaseModel, kwargs: Mapping[str, Any]) -> str:
    """SHA-256 of the planning fields and the planner's keyword arguments (files by content)."""
    doc = {
        "spec": planning_fields(spec),
        "kwargs": {k: _canonical(v, is_file=k in FILE_ARGUMENTS) for k, v in sorted(kwargs.items())},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any, *, is_file: bool = False) -> Any:
    if is_file and isinstance(value, str | PurePath) and Path(value).is_file():
        return {"fileSha256": hashlib.sha256(Path(value).read_bytes()).hexdigest()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    # Refuse rather than key on something like repr(): a wrong key would hand out another's plan.
    raise TypeError(f"cannot key a plan on a {type(value).__name__}")


class Lookup(StrEnum):
    HIT = "hit"  # a finished plan reused
    SHARED = "shared"  # joined an identical plan in progress
    MISS = "miss"  # planned


T = TypeVar("T")


class PlanCache(Generic[T]):
    """LRU of finished results by key, plus the computations in progress (single-flight).

    Values are shared between callers: treat them as immutable (the operator only model_copies
    plans). Failures are not kept: every waiter of a failed run gets its exception, the next
    lookup runs again. A run outlives a cancelled caller, so the others still get its result."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._done: OrderedDict[str, T] = OrderedDict()
        self._running: dict[str, asyncio.Future[T]] = {}

    def __len__(self) -> int:
        return len(self._done)

    async def get(self, key: str, compute: Callable[[], Awaitable[T]]) -> tuple[T, Lookup]:
        if key in self._done:
            self._done.move_to_end(key)
            return self._done[key], Lookup.HIT
        running = self._running.get(key)
        lookup = Lookup.SHARED
        if running is None:
            running = self._running[key] = asyncio.ensure_future(compute())
            running.add_done_callback(functools.partial(self._finished, key))
            lookup = Lookup.MISS
        return await asyncio.shield(running), lookup

    def _finished(self, key: str, future: asyncio.Future[T]) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if future.cancelled() or future.exception() is not None or self.size <= 0:
            return
        self._done[key] = future.result()
        self._done.move_to_end(key)
        while len(self._done) > self.size:
            self._done.popitem(last=False)
