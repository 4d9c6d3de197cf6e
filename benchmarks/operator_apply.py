"""What the operator asks of the API server: requests per child per resync, and time to converge.

N DistServeDeployments are applied against the API-server emulator with the real operator
(in-process, as the operator tests run it; resync every second). Figures:

- time from the first create to every deployment Ready with all its children written (median of
  the per-deployment times, and the last);
- in steady state (all Ready, nothing changing), the operator's API requests per child per resync,
  by method, over a fixed window, and the median time of one resync pass
  (`distserve_operator_reconcile_seconds`, from the operator's own metrics).

`--baseline-tree DIR` runs the same measurement on another checkout (a git worktree of an older
commit) in a subprocess, in the same run, against this checkout's emulator, and prints the ratios. Issue 16 measured server-side
apply (this tree) against the GET + compare + merge-patch client it replaced:

    git worktree add /tmp/before 4123050
    .venv/bin/python benchmarks/operator_apply.py --count 20 --baseline-tree /tmp/before
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _use_tree(tree: Path) -> None:
    """The operator of `tree`; the emulator and harness of this checkout, for both runs (the
    same API server for the baseline: it filters lists by label like a real one, and answers
    a no-op apply without a write)."""
    for part in (ROOT / "tests", tree / "protos", tree / "worker", tree / "operator"):
        sys.path.insert(0, str(part))


async def _measure(count: int, window: float) -> dict[str, Any]:
    from operator_support.harness import operator_env
    from operator_support.manifests import dsd
    from operator_support.planners import plan_fn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with operator_env(plan_fn=plan_fn(), resync_seconds=1.0, metrics_port=port) as env:
        await env.start_operator()
        names = [f"llm-{i:03d}" for i in range(count)]
        start = time.monotonic()
        ready_at: dict[str, float] = {}
        for name in names:
            await env.create(dsd(name))
        while len(ready_at) < count:
            for name in names:
                if name not in ready_at and env.condition(name, "Ready"):
                    ready_at[name] = time.monotonic() - start
            if time.monotonic() - start > 600:
                raise SystemExit("not all deployments became Ready within 600 s")
            await asyncio.sleep(0.05)
        children = sum(
            len(env.children(kind, name))
            for name in names
            for kind in (
                "apps/v1/statefulsets",
                "apps/v1/deployments",
                "v1/services",
                "v1/configmaps",
                "networking.k8s.io/v1/networkpolicies",
            )
        )

        async def reconcile_seconds() -> tuple[float, float]:
            async with env.session.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            total = count_ = 0.0
            for line in text.splitlines():
                if line.startswith("distserve_operator_reconcile_seconds_sum"):
                    total = float(line.split()[-1])
                elif line.startswith("distserve_operator_reconcile_seconds_count"):
                    count_ = float(line.split()[-1])
            return total, count_

        await asyncio.sleep(2.0)  # let the last deployments' first resyncs pass
        before_log = len(env.api.log)
        sum0, n0 = await reconcile_seconds()
        t0 = time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - t0
        sum1, n1 = await reconcile_seconds()
        entries = env.api.log[before_log:]
        await env.stop_operator()
    by_method: collections.Counter[str] = collections.Counter()
    for entry in entries:
        method, url = entry[0], entry[1]
        if "/events" in url or "watch=" in url:
            continue
        if "distservedeployments" in url and method == "GET":
            continue  # kopf's and the resync's read of the CR: the same in both
        by_method[method] += 1
    passes = n1 - n0
    per_child_pass = {m: round(c / children / (passes / count), 3) for m, c in sorted(by_method.items())}
    return {
        "deployments": count,
        "children": children,
        "ready_median_s": round(statistics.median(ready_at.values()), 3),
        "ready_last_s": round(max(ready_at.values()), 3),
        "window_s": round(elapsed, 2),
        "resync_passes": int(passes),
        "requests_per_child_per_pass": per_child_pass,
        "requests_per_child_per_pass_total": round(sum(per_child_pass.values()), 3),
        "reconcile_mean_ms": round(1000 * (sum1 - sum0) / passes, 2) if passes else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20, help="deployments (default 20)")
    parser.add_argument("--window", type=float, default=10.0, help="steady-state window, seconds")
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose operator to measure")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout, measured in the same run")
    parser.add_argument("--json", action="store_true", help="print one JSON object (used for the baseline)")
    args = parser.parse_args(argv)
    _use_tree(args.tree.resolve())
    baseline = None
    if args.baseline_tree is not None:
        print(f"baseline: {args.baseline_tree} ...", file=sys.stderr, flush=True)
        tree = args.baseline_tree.resolve()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(tree / p) for p in ("operator", "worker", "protos")),
        }
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--count",
                str(args.count),
                "--window",
                str(args.window),
                "--tree",
                str(tree),
                "--json",
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        baseline = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"this tree: {args.tree} ...", file=sys.stderr, flush=True)
    result = asyncio.run(_measure(args.count, args.window))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for label, r in (("baseline", baseline), ("this tree", result)):
        if r is None:
            continue
        print(
            f"{label:>9}: {r['deployments']} deployments, {r['children']} children; all Ready in "
            f"{r['ready_last_s']} s (median {r['ready_median_s']} s); steady state: "
            f"{r['requests_per_child_per_pass_total']} requests per child per resync "
            f"{r['requests_per_child_per_pass']}, {r['reconcile_mean_ms']} ms per resync pass "
            f"({r['resync_passes']} passes in {r['window_s']} s)"
        )
    if baseline is not None:

        def ratio(key: str) -> str:
            b, n = baseline.get(key), result.get(key)
            return f"{n / b:.2f}x" if b and n is not None else "n/a"

        print(
            f"    ratio: requests per child per resync {ratio('requests_per_child_per_pass_total')}, "
            f"resync pass {ratio('reconcile_mean_ms')}, all Ready {ratio('ready_last_s')}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
