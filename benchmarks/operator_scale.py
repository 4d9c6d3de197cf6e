"""Operator at scale: N DistServeDeployments applied against the API-server emulator.

Measures, per CR, the time from its create request returning to `status.plan` appearing (median,
p90), the operator process's peak memory (VmHWM), and same-run baselines: the planner's own wall
time for one CR (in this process) and the create->plan time with a single CR.

The operator runs as a real `distserve operator` subprocess (kopf, standalone, all namespaces)
pointed at the emulator with `--api-server`; the emulator (kmock, subclassed to behave like an API
server) runs in this process.

    .venv/bin/python benchmarks/operator_scale.py --count 100
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
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

from distserve_operator.api import parse_spec  # noqa: E402
from distserve_planner import plan_deployment  # noqa: E402

CR_PATH = "/apis/distserve.io/v1alpha1/namespaces/{ns}/distservedeployments"
EXAMPLE = ROOT / "deploy/examples/opt-13b-a100x4.yaml"


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run_once(count: int, manifest: dict[str, Any], namespace: str, timeout: float) -> dict[str, Any]:
    async with ApiServerEmulator() as api, Server(api) as server, aiohttp.ClientSession() as session:
        api.register_resources()
        url = str(server.url).rstrip("/")
        env = {**os.environ, "DISTSERVE_OPERATOR_METRICS_PORT": "off"}
        proc = subprocess.Popen(
            [
                str(ROOT / ".venv/bin/distserve"),
                "operator",
                "--api-server",
                url,
                "--router-metrics-url",
                "http://127.0.0.1:9/metrics",
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
            started = time.monotonic()
            for i in range(count):
                body = copy.deepcopy(manifest)
                body["metadata"] = {"name": f"bench-{i:03d}"}
                async with session.post(url + CR_PATH.format(ns=namespace), json=body) as resp:
                    assert resp.status < 400, await resp.text()
                created[body["metadata"]["name"]] = time.monotonic()
                await _collect(api, namespace, created, planned)
            deadline = time.monotonic() + timeout
            while len(planned) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                await _collect(api, namespace, created, planned)
            wall = time.monotonic() - started
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
            "all_planned_wall_s": wall,
            "operator_peak_rss_mib": peak,
        }


async def _collect(
    api: ApiServerEmulator, namespace: str, created: dict[str, float], planned: dict[str, float]
) -> None:
    # Read the emulator's objects in place (no copies): this loop shares the emulator's CPU.
    now = time.monotonic()
    for (res, ns, name), obj in list(api.objects.items()):
        if res.plural != "distservedeployments" or ns != namespace or name in planned or name not in created:
            continue
        if not obj.deleted and (obj.raw.get("status") or {}).get("plan"):
            planned[name] = now


def planner_wall(manifest: dict[str, Any], repeats: int = 5) -> float:
    spec = parse_spec(manifest["spec"])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        plan_deployment(spec)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--manifest", type=Path, default=EXAMPLE)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    manifest = next(d for d in yaml.safe_load_all(args.manifest.read_text()) if d and d.get("kind"))
    single = asyncio.run(run_once(1, manifest, "bench-one", args.timeout))
    many = asyncio.run(run_once(args.count, manifest, "bench", args.timeout))
    plan_s = planner_wall(manifest)
    result = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "manifest": str(
            args.manifest.relative_to(ROOT) if args.manifest.is_relative_to(ROOT) else args.manifest
        ),
        "planner_wall_one_cr_s": plan_s,
        "one_cr": single,
        "many_crs": many,
        "ratio_median_vs_planner": (many["median_s"] or 0) / plan_s if plan_s else None,
        "ratio_median_vs_one_cr": (many["median_s"] or 0) / single["median_s"]
        if single["median_s"]
        else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"machine: {result['machine']}")
        print(f"planner wall time, one CR (median of 5): {plan_s * 1000:.0f} ms")
        print(
            f"1 CR:   create -> status.plan {single['median_s']:.3f} s; operator peak RSS {single['operator_peak_rss_mib']:.0f} MiB"
        )
        print(
            f"{many['count']} CRs: planned {many['planned']}/{many['count']}; create -> status.plan median "
            f"{many['median_s']:.3f} s, p90 {many['p90_s']:.3f} s, max {many['max_s']:.3f} s; all planned in "
            f"{many['all_planned_wall_s']:.1f} s; operator peak RSS {many['operator_peak_rss_mib']:.0f} MiB"
        )
        print(
            f"ratios: median / planner wall = {result['ratio_median_vs_planner']:.1f}x; "
            f"median {many['count']} CRs / 1 CR = {result['ratio_median_vs_one_cr']:.1f}x"
        )
    return 0 if many["planned"] == many["count"] else 1


if __name__ == "__main__":
    sys.exit(main())
