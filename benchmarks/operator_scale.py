"""Operator at scale: N DistServeDeployments applied against the API-server emulator.

Two runs of N CRs each, every CR's time measured from its create request returning to `status.plan`
appearing (median, p90, max; the time until all are planned), with the operator process's peak
memory (VmHWM):

- identical: N copies of one manifest (one planning input: the operator plans it once);
- distinct: N variants with different rates and SLOs (no two alike: N planner runs).

Same-run baselines: the planner's wall time for the manifest in this process (median of 5), the
create->plan time of a single CR, the sequential floor of the distinct run (the N distinct specs
planned one after another in this process, one core), and the same specs planned all at once
through the operator's planner processes with no operator or emulator around. CPU seconds of the
operator, its planner processes and this process (emulator and driver) are reported per run.

The operator runs as a real `distserve operator` subprocess (kopf, standalone, all namespaces;
planner processes as its settings choose, `--planner-processes` to force) pointed at the emulator
with `--api-server`; the emulator (kmock, subclassed to behave like an API server) runs in this
process.

    .venv/bin/python benchmarks/operator_scale.py --count 100
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kmock import Server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from operator_support.emulator import ApiServerEmulator  # noqa: E402

from distserve_operator import plan_pool  # noqa: E402
from distserve_operator.api import parse_spec  # noqa: E402
from distserve_planner import plan_deployment  # noqa: E402

PLURAL = "distservedeployments"
CR_PATH = "/apis/distserve.io/v1alpha1/namespaces/{ns}/" + PLURAL
_CR_RESOURCE: dict[str, Any] = {}  # the emulator's key of the CR resource, by namespace
EXAMPLE = ROOT / "deploy/examples/opt-13b-a100x4.yaml"


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _cpu_split(operator_pid: int) -> dict[str, float]:
    """CPU seconds so far: the operator process, its planner processes, this process (the emulator
    and the driver)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "operator": _cpu_s(operator_pid),
        "planner_processes": sum(_cpu_s(k) for k in _children(operator_pid)),
        "emulator_and_driver": usage.ru_utime + usage.ru_stime,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def variants(manifest: dict[str, Any], count: int, *, distinct: bool) -> list[dict[str, Any]]:
    """`count` bodies of `manifest`; `distinct`: each with its own rate and SLO (no two plan alike)."""
    out = []
    for i in range(count):
        body = copy.deepcopy(manifest)
        body["metadata"] = {"name": f"bench-{i:03d}"}
        if distinct:
            spec = body["spec"]
            rate = float(spec["workload"]["requestsPerSecond"])
            spec["workload"]["requestsPerSecond"] = f"{rate * (0.5 + 0.1 * (i % 10)):.2f}"
            spec["slo"] = {
                **spec["slo"],
                "ttftMillis": spec["slo"]["ttftMillis"] + 25 * (i // 10 % 5),
                "tpotMillis": spec["slo"]["tpotMillis"] + 10 * (i // 50),
            }
        out.append(body)
    return out


async def run_once(
    bodies: list[dict[str, Any]], namespace: str, timeout: float, operator_args: list[str]
) -> dict[str, Any]:
    count = len(bodies)
    async with ApiServerEmulator() as api, Server(api) as server, aiohttp.ClientSession() as session:
        api.register_resources()
        url = str(server.url).rstrip("/")
        env = {**os.environ, "DISTSERVE_OPERATOR_METRICS_PORT": "off"}
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("distserve")),
                "operator",
                "--api-server",
                url,
                "--router-metrics-url",
                "http://127.0.0.1:9/metrics",
                *operator_args,
                "--standalone",
                "--all-namespaces",
                "--quiet",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # Ready: kopf has listed the (empty) resource once.
            deadline = time.monotonic() + 60
            while api.count("GET", "distservedeployments") == 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"operator did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                    )
                await asyncio.sleep(0.05)
            created: dict[str, float] = {}
            planned: dict[str, float] = {}
            cpu_before = _cpu_split(proc.pid)
            started = time.monotonic()
            for body in bodies:
                async with session.post(url + CR_PATH.format(ns=namespace), json=body) as resp:
                    assert resp.status < 400, await resp.text()
                created[body["metadata"]["name"]] = time.monotonic()
                await _collect(api, namespace, created, planned)
            create_s = time.monotonic() - started
            deadline = time.monotonic() + timeout
            while len(planned) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                await _collect(api, namespace, created, planned)
            wall = time.monotonic() - started
            cpu_after = _cpu_split(proc.pid)
            peak = _peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        latencies = [planned[n] - created[n] for n in planned]
        return {
            "count": count,
            "planned": len(planned),
            "median_s": statistics.median(latencies) if latencies else None,
            "p90_s": _pct(latencies, 0.9) if latencies else None,
            "max_s": max(latencies) if latencies else None,
            "all_created_s": create_s,
            "all_planned_wall_s": wall,
            "operator_peak_rss_mib": peak,
            # From the first create to the last plan; what is left of 2 x wall on a 2-core box
            # went to other processes.
            "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
        }


async def _collect(
    api: ApiServerEmulator, namespace: str, created: dict[str, float], planned: dict[str, float]
) -> None:
    # Look up only the CRs not yet planned, in place (no copies, no scan of every child object):
    # this loop shares the emulator's CPU, which the operator needs.
    now = time.monotonic()
    resource = _CR_RESOURCE.get(namespace)
    if resource is None:
        resource = next(
            (r for (r, ns, _), _o in list(api.objects.items()) if r.plural == PLURAL and ns == namespace),
            None,
        )
        if resource is None:
            return
        _CR_RESOURCE[namespace] = resource
    objects = api.objects._objects  # kmock's dict by (resource, namespace, name)
    for name in created.keys() - planned.keys():
        obj = objects.get((resource, namespace, name))
        if obj is not None and not obj.deleted and (obj.raw.get("status") or {}).get("plan"):
            planned[name] = now


def planner_wall(manifest: dict[str, Any], repeats: int = 5) -> float:
    spec = parse_spec(manifest["spec"])
    plan_deployment(spec)  # imports and first-call costs out of the figure
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        plan_deployment(spec)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sequential_floor(bodies: list[dict[str, Any]]) -> float:
    """Wall time of planning every body one after another in this process (one core)."""
    specs = [parse_spec(b["spec"]) for b in bodies]
    started = time.perf_counter()
    for spec in specs:
        plan_deployment(spec)
    return time.perf_counter() - started


def pool_wall(bodies: list[dict[str, Any]], processes: int) -> float:
    """Wall time of planning every body at once through the operator's planner processes, with
    no operator or emulator around (0 when the operator would plan in threads)."""
    if processes < 1:
        return 0.0
    specs = [parse_spec(b["spec"]) for b in bodies]
    pool = plan_pool.PlannerPool(processes)

    async def plan_all() -> float:
        await pool.start()
        started = time.perf_counter()
        await asyncio.gather(*(pool.plan(spec, {}) for spec in specs))
        return time.perf_counter() - started

    try:
        return asyncio.run(plan_all())
    finally:
        pool.shutdown()


def _line(label: str, r: dict[str, Any]) -> str:
    cpu = r["cpu_s"]
    return (
        f"{label}: planned {r['planned']}/{r['count']}; create -> status.plan median {r['median_s']:.3f} s, "
        f"p90 {r['p90_s']:.3f} s, max {r['max_s']:.3f} s; all created in {r['all_created_s']:.1f} s, "
        f"all planned in {r['all_planned_wall_s']:.1f} s; operator peak RSS {r['operator_peak_rss_mib']:.0f} MiB; "
        f"CPU meanwhile: operator {cpu['operator']:.1f} s, planner processes {cpu['planner_processes']:.1f} s, "
        f"emulator and driver {cpu['emulator_and_driver']:.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--manifest", type=Path, default=EXAMPLE)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--planner-processes", type=int, help="passed to the operator (default: its own choice)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    manifest = next(d for d in yaml.safe_load_all(args.manifest.read_text()) if d and d.get("kind"))
    op_args = [] if args.planner_processes is None else ["--planner-processes", str(args.planner_processes)]
    identical = variants(manifest, args.count, distinct=False)
    distinct = variants(manifest, args.count, distinct=True)
    load_before = os.getloadavg()
    single = asyncio.run(run_once(identical[:1], "bench-one", args.timeout, op_args))
    same = asyncio.run(run_once(identical, "bench-same", args.timeout, op_args))
    varied = asyncio.run(run_once(distinct, "bench-varied", args.timeout, op_args))
    plan_s = planner_wall(manifest)
    floor_s = sequential_floor(distinct)
    processes = plan_pool.processes_for(args.planner_processes)
    pool_s = pool_wall(distinct, processes)
    result = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_before_after": [load_before, os.getloadavg()],
        "manifest": str(
            args.manifest.relative_to(ROOT) if args.manifest.is_relative_to(ROOT) else args.manifest
        ),
        "operator_args": op_args,
        "planner_wall_one_cr_s": plan_s,
        "sequential_floor_distinct_s": floor_s,
        "planner_processes": processes,
        "pool_alone_distinct_s": pool_s,
        "one_cr": single,
        "identical_crs": same,
        "distinct_crs": varied,
        "ratio_identical_median_vs_planner": (same["median_s"] or 0) / plan_s,
        "ratio_distinct_all_planned_vs_floor": varied["all_planned_wall_s"] / floor_s,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"machine: {result['machine']}; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
        )
        print(f"operator flags: {' '.join(op_args) or '(defaults)'}")
        print(f"planner wall time, one CR (median of 5): {plan_s * 1000:.0f} ms")
        print(f"sequential floor, the {args.count} distinct specs planned one by one here: {floor_s:.1f} s")
        if processes:
            print(
                f"the same specs at once through {processes} planner processes, no operator: {pool_s:.1f} s "
                f"({pool_s / floor_s:.2f}x the floor)"
            )
        print(
            f"1 CR: create -> status.plan {single['median_s']:.3f} s; operator peak RSS {single['operator_peak_rss_mib']:.0f} MiB"
        )
        print(_line(f"{args.count} identical CRs", same))
        print(_line(f"{args.count} distinct CRs", varied))
        print(
            f"ratios: identical median / planner wall = {result['ratio_identical_median_vs_planner']:.1f}x; "
            f"distinct all planned / sequential floor = {result['ratio_distinct_all_planned_vs_floor']:.2f}x"
        )
    return 0 if same["planned"] == same["count"] and varied["planned"] == varied["count"] else 1


if __name__ == "__main__":
    sys.exit(main())
