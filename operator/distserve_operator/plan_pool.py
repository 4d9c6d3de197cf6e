"""The default planner in worker processes, so that many deployments are planned on every core.

The planner is CPU-bound pure Python: in threads it uses one core (the GIL). Only JSON text crosses
the process boundary (nothing of ours is ever unpickled): the spec as its wire JSON, keyword
arguments as plain JSON values (`workload_override` and a parsed `profile` as their JSON), and the plan as the
PlanStatus's wire JSON, validated again on this side. A planner ValueError (a spec it cannot plan,
naming the field) comes back as JSON and is raised here as ValueError with the same message, so
the reconcile's handling of planner errors is the same in a process or a thread.

Processes are spawned, not forked: no kopf or asyncio state goes with them, and this module
imports no kopf. Each imports the planner when it starts (`PlannerPool.start`, awaited at operator
start), so the first plan does not pay for the import. A pool whose process died (BrokenProcessPool: an
OOM kill, a crash) is replaced and the plan tried once more on the fresh one.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel

from distserve_planner.profiles import Profile

from .api import DistServeDeploymentSpec, PlanStatus, WorkloadSnapshot

# Keyword arguments that may be models: sent as their JSON, validated again in the process (a
# `profile` may also be a file or a bundled profile's name: a string, sent as it is).
_MODEL_ARGUMENTS: dict[str, type[BaseModel]] = {"workload_override": WorkloadSnapshot, "profile": Profile}


class PlannerProcessError(RuntimeError):
    """The planner failed in its process with something other than a ValueError, or the process died."""


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's CPU limit) when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


# Auto never starts more: each process holds ~40 MiB, and an operator pod without a CPU limit on a
# large node sees every core of it (the chart's memory limit is 1 GiB).
MAX_AUTO_PROCESSES = 4


def processes_for(setting: int | None) -> int:
    """Planner processes for the `planner_processes` setting: None is one per usable CPU (at most
    MAX_AUTO_PROCESSES) when there are two or more, else 0 (threads); a number is taken as it is."""
    if setting is not None:
        return setting
    cpus = usable_cpus()
    return min(cpus, MAX_AUTO_PROCESSES) if cpus > 1 else 0


# ---------------------------------------------------------------------------- the JSON codec


def encode_kwargs(kwargs: dict[str, Any]) -> str:
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _MODEL_ARGUMENTS and isinstance(value, _MODEL_ARGUMENTS[key]):
            value = value.model_dump(mode="json", by_alias=True)
        elif isinstance(value, PurePath):
            value = str(value)
        elif not (value is None or isinstance(value, bool | int | float | str)):
            raise TypeError(
                f"planner argument {key}: a {type(value).__name__} cannot go to a planner process "
                "(only JSON values and the models in plan_pool._MODEL_ARGUMENTS)"
            )
        out[key] = value
    return json.dumps(out)


def decode_kwargs(text: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = json.loads(text)
    for key, model in _MODEL_ARGUMENTS.items():
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = model.model_validate(kwargs[key])
    return kwargs


def plan_json(spec_json: str, kwargs_json: str) -> str:
    """Runs in a planner process: JSON in, JSON out, every error returned as JSON."""
    try:
        from distserve_planner import plan_deployment

        spec = DistServeDeploymentSpec.model_validate_json(spec_json)
        report = plan_deployment(spec, **decode_kwargs(kwargs_json))
        return json.dumps({"status": report.status.model_dump(mode="json", by_alias=True)})
    except ValueError as exc:
        return json.dumps({"error": "ValueError", "message": str(exc)})
    except Exception as exc:
        return json.dumps({"error": type(exc).__name__, "message": str(exc)})


def decode_result(text: str) -> PlanStatus:
    doc = json.loads(text)
    if "error" in doc:
        if doc["error"] == "ValueError":
            raise ValueError(doc["message"])
        raise PlannerProcessError(f"{doc['error']}: {doc['message']}")
    return PlanStatus.model_validate(doc["status"])


def _import_planner() -> None:
    import distserve_planner  # noqa: F401  # the pool's initializer: paid once per process


def _ready() -> int:
    return os.getpid()


# ---------------------------------------------------------------------------- the pool


class PlannerPool:
    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("a planner pool needs at least one process")
        self.processes = processes
        self._executor = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_import_planner,
        )

    def warm(self) -> list[Future[int]]:
        """Start every process now (each imports the planner); returns futures of their pids."""
        return [self._executor.submit(_ready) for _ in range(self.processes)]

    async def start(self, timeout: float = 120.0) -> None:
        """Start every process and wait until each has imported the planner."""
        await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in self.warm())), timeout)

    async def plan(self, spec: DistServeDeploymentSpec, kwargs: dict[str, Any]) -> PlanStatus:
        """The default planner's status for `spec`; ValueError as the planner raised it."""
        spec_json, kwargs_json = spec.model_dump_json(by_alias=True), encode_kwargs(kwargs)
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            executor = self._executor
            try:
                text = await loop.run_in_executor(executor, plan_json, spec_json, kwargs_json)
            except BrokenProcessPool as exc:
                self._replace(executor)
                if attempt == 2:
                    raise PlannerProcessError(
                        f"a planner process died twice planning this spec: {exc}"
                    ) from exc
                continue
            return decode_result(text)
        raise AssertionError("unreachable")

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self._executor is broken:  # the first of the plans that saw it break replaces it
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new()
            self.warm()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
