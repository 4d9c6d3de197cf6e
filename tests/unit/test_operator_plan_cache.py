"""Plans computed once per planning input (plan_cache) and the planner processes (plan_pool)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support
from operator_support.manifests import BASE_SPEC

from distserve_operator import plan_pool
from distserve_operator import reconcile as R
from distserve_operator.api import DistServeDeploymentSpec, PlanStatus, WorkloadSnapshot, parse_spec
from distserve_operator.api.spec import Autoscaling, Cluster, Placement
from distserve_operator.metrics import OperatorMetrics
from distserve_operator.plan_cache import NOT_PLANNING, Lookup, PlanCache, planning_key
from distserve_operator.settings import OperatorSettings
from distserve_planner import plan_deployment
from distserve_planner.loaders import profile_files

ROOT = Path(__file__).parents[2]

# Plans in ~10 ms: the pool tests pay for process start-up, not for planning.
TINY = {
    **BASE_SPEC,
    "cluster": {**BASE_SPEC["cluster"], "gpusPerNode": 2},
    "planner": {"simulatedRequests": 50},
}


def spec(**overrides: Any) -> DistServeDeploymentSpec:
    raw = copy.deepcopy(TINY)
    for section, fields in overrides.items():
        raw[section] = {**raw.get(section, {}), **fields}
    return parse_spec(raw)


# ---------------------------------------------------------------------------- the key


def test_key_follows_planning_fields_only() -> None:
    base = planning_key(spec(), {})
    assert planning_key(spec(), {}) == base
    # Not read by the planner: the same plan.
    assert planning_key(spec(router={"replicas": 5}), {}) == base
    assert planning_key(spec(worker={"image": "other:1"}), {}) == base
    assert planning_key(spec(autoscaling={"cooldownSeconds": 600}), {}) == base
    assert planning_key(spec(cluster={"nodeSelector": {}}), {}) == base
    # Read by the planner: another plan.
    assert planning_key(spec(workload={"requestsPerSecond": "551"}), {}) != base
    assert planning_key(spec(slo={"tpotMillis": 99}), {}) != base
    assert planning_key(spec(autoscaling={"maxGPUs": 1}), {}) != base  # a pin's budget
    assert planning_key(spec(planner={"seed": 1}), {}) != base
    # Overrides are part of the input.
    assert planning_key(spec(), {"rate_override": 3.0}) != base
    snapshot = WorkloadSnapshot(requests_per_second=3.0)
    assert planning_key(spec(), {"workload_override": snapshot}) == planning_key(
        spec(), {"workload_override": WorkloadSnapshot(requests_per_second=3.0)}
    )


def test_not_planning_names_real_fields() -> None:
    sections = DistServeDeploymentSpec.model_fields
    for model, section in ((Autoscaling, "autoscaling"), (Cluster, "cluster"), (Placement, "placement")):
        assert NOT_PLANNING[section] is not None and NOT_PLANNING[section] <= set(model.model_fields)
    assert set(NOT_PLANNING) <= set(sections)
    assert "max_gpus" not in (NOT_PLANNING["autoscaling"] or set())


def test_profile_file_keyed_by_content(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text('{"a": 1}')
    first = planning_key(spec(), {"profile": str(path)})
    assert planning_key(spec(), {"profile": path}) == first
    path.write_text('{"a": 2}')
    assert planning_key(spec(), {"profile": str(path)}) != first
    # A name that is no file (a bundled profile) is keyed as written.
    assert planning_key(spec(), {"profile": "opt-13b-a100"}) != planning_key(spec(), {"profile": "other"})
    with pytest.raises(TypeError):
        planning_key(spec(), {"profile": object()})


# ---------------------------------------------------------------------------- LRU and single-flight


def test_lru_and_single_flight() -> None:
    async def main() -> None:
        cache: PlanCache[int] = PlanCache(size=2)
        calls: list[str] = []

        async def compute(key: str) -> int:
            calls.append(key)
            await asyncio.sleep(0.01)
            return len(calls)

        results = await asyncio.gather(*(cache.get("a", lambda: compute("a")) for _ in range(10)))
        assert calls == ["a"] and {v for v, _ in results} == {1}
        assert sorted(lookup for _, lookup in results) == [Lookup.MISS] + [Lookup.SHARED] * 9
        assert await cache.get("a", lambda: compute("a")) == (1, Lookup.HIT)
        await cache.get("b", lambda: compute("b"))
        await cache.get("a", lambda: compute("a"))  # a is now the most recent
        await cache.get("c", lambda: compute("c"))  # evicts b
        assert len(cache) == 2 and (await cache.get("b", lambda: compute("b")))[1] is Lookup.MISS

        async def fail() -> int:
            await asyncio.sleep(0.01)
            raise ValueError("spec.model: no")

        failed = await asyncio.gather(*(cache.get("x", fail) for _ in range(3)), return_exceptions=True)
        assert [str(e) for e in failed] == ["spec.model: no"] * 3
        assert (await cache.get("x", lambda: compute("x")))[1] is Lookup.MISS  # failures are not kept

    asyncio.run(main())


# ---------------------------------------------------------------------------- through the reconcile


CPU_PROFILE = ROOT / "deploy/profiles/smollm2-135m-cpu.json"


class FakeKube:
    def __init__(self) -> None:
        self.profile = CPU_PROFILE.read_text()

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return {"data": {"profile.json": self.profile}}


class CountingPlanner:
    """The real plan of the tiny spec, computed once; counts (and slows) the calls."""

    def __init__(self) -> None:
        self.report = plan_deployment(spec())
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, s: DistServeDeploymentSpec, **kwargs: Any) -> Any:
        with self.lock:
            self.calls.append(kwargs)
        time.sleep(0.02)
        return self.report


def test_reconcile_plans_identical_inputs_once() -> None:
    planner = CountingPlanner()
    kube = FakeKube()
    rt = R.Runtime(
        settings=OperatorSettings(metrics_port=None),
        kube=kube,  # type: ignore[arg-type]
        metrics=OperatorMetrics(),
        executor=ThreadPoolExecutor(max_workers=2),
        plan_fn=planner,
        plans=PlanCache(8),
        apply_slots=asyncio.Semaphore(1),
    )
    with_profile = spec(planner={"profileConfigMap": "prof"})

    async def main() -> None:
        many = await asyncio.gather(
            *(R._run_planner(rt, spec(), "Created", namespace="ns", name="llm") for _ in range(20))
        )
        assert len(planner.calls) == 1 and all(s is many[0] for s in many)
        await R._run_planner(rt, spec(router={"replicas": 4}), "Created", namespace="ns", name="llm")
        assert len(planner.calls) == 1  # not a planning field
        await R._run_planner(
            rt, spec(workload={"requestsPerSecond": "600"}), "Created", namespace="ns", name="llm"
        )
        assert len(planner.calls) == 2
        await R._run_planner(rt, with_profile, "Created", namespace="ns", name="llm")
        await R._run_planner(rt, with_profile, "Created", namespace="ns", name="llm")
        assert len(planner.calls) == 3
        kube.profile = CPU_PROFILE.read_text().replace(  # the ConfigMap changed: plan again
            '"source": "', '"source": "re-measured ', 1
        )
        await R._run_planner(rt, with_profile, "Created", namespace="ns", name="llm")
        assert len(planner.calls) == 4
        assert planner.calls[2]["profile"] != planner.calls[3]["profile"]

    asyncio.run(main())
    text = rt.metrics.render().decode()
    assert 'distserve_operator_plan_cache_lookups_total{result="miss"} 4.0' in text
    assert 'distserve_operator_plan_cache_lookups_total{result="shared"} 19.0' in text
    assert 'distserve_operator_plan_cache_lookups_total{result="hit"} 2.0' in text
    rt.executor.shutdown()


# ---------------------------------------------------------------------------- planner processes


@pytest.fixture(scope="module")
def pool() -> Iterator[plan_pool.PlannerPool]:
    p = plan_pool.PlannerPool(1)
    p.warm()
    yield p
    p.shutdown()


def _without_time(status: PlanStatus) -> dict[str, Any]:
    return status.model_dump(exclude={"search_seconds"})


def test_pool_plans_like_the_planner(pool: plan_pool.PlannerPool) -> None:
    s = spec()
    override = WorkloadSnapshot(requests_per_second=300.0, input_tokens_mean=400.0)
    got = asyncio.run(pool.plan(s, {"workload_override": override}))
    assert _without_time(got) == _without_time(plan_deployment(s, workload_override=override).status)


def test_pool_plans_with_a_parsed_profile(pool: plan_pool.PlannerPool) -> None:
    """A profileConfigMap's profile reaches the planner process as its JSON, not pickled."""
    s = spec()
    profile = profile_files.load(ROOT / "deploy/profiles/smollm2-135m-cpu.json")
    got = asyncio.run(pool.plan(s, {"profile": profile}))
    assert _without_time(got) == _without_time(plan_deployment(s, profile=profile).status)
    assert (
        got.profile == plan_deployment(s, profile=profile).status.profile != plan_deployment(s).status.profile
    )


def test_pool_raises_the_planners_value_error(pool: plan_pool.PlannerPool) -> None:
    unknown = spec(model={"name": "nobody/unknown-model"})
    with pytest.raises(ValueError) as in_process:
        plan_deployment(unknown)
    with pytest.raises(ValueError) as in_pool:
        asyncio.run(pool.plan(unknown, {}))
    assert str(in_pool.value) == str(in_process.value) and "spec.model.architecture" in str(in_pool.value)


def test_pool_replaced_when_a_process_dies(pool: plan_pool.PlannerPool) -> None:
    (pid,) = {f.result(timeout=60) for f in pool.warm()}
    os.kill(pid, signal.SIGKILL)
    assert asyncio.run(pool.plan(spec(), {})).summary  # a fresh pool planned it
    (new_pid,) = {f.result(timeout=60) for f in pool.warm()}
    assert new_pid != pid


def test_only_json_crosses() -> None:
    with pytest.raises(TypeError):
        plan_pool.encode_kwargs({"profile": object()})
    assert plan_pool.processes_for(0) == 0 and plan_pool.processes_for(3) == 3
    assert plan_pool.processes_for(None) in (0, *range(2, plan_pool.MAX_AUTO_PROCESSES + 1))
