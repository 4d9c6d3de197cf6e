"""A staged re-plan on the API-server emulator: how long from the decision to the old groups gone.

The real operator (kopf, in-process, the real planner) runs against the emulator; a test controller
(tests/operator_support/controllers.py) plays the StatefulSet controller and the kubelet: a pod is
Ready `--ready` seconds after it is asked for, and a pod scaled away takes `--drain` seconds to
finish its requests. A pinned deployment (SmolLM2: prefill TP1, decode TP1 x2) is re-pinned to
another shape (prefill TP3, decode TP1xPP2), which brings up new groups beside the old ones.

Per run it measures, from the spec patch returning:
- the decision: status.rollout appears (planned, new groups applied);
- the new groups Ready; the old groups scaled to zero; the old groups gone (objects deleted);
- the fewest ready instances any role had at any tick (must stay >= 1).
The baseline is what the simulated cluster itself costs: ready + drain seconds; the ratio says how
much the operator's steps (one step per reconcile, every rollout_poll_seconds) add.

    .venv/bin/python benchmarks/staged_replan.py --ready 2 5 10 --drain 1 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from operator_support.controllers import StatefulSetController, names  # noqa: E402
from operator_support.harness import NS, eventually, operator_env  # noqa: E402
from operator_support.manifests import dsd  # noqa: E402
from operator_support.planners import plan_fn  # noqa: E402

PIN_A = {"prefill": {"tp": 1, "pp": 1, "replicas": 1}, "decode": {"tp": 1, "pp": 1, "replicas": 2}}
PIN_B = {"prefill": {"tp": 3, "pp": 1, "replicas": 1}, "decode": {"tp": 1, "pp": 2, "replicas": 2}}


async def run_once(ready: float, drain: float, resync: float, poll: float) -> dict[str, Any]:
    async with operator_env(plan_fn=plan_fn(), resync_seconds=resync, rollout_poll_seconds=poll) as env:
        ctl = StatefulSetController(
            env.api, env.url, env.session, NS, ready_seconds=ready, drain_seconds=drain
        )
        async with ctl.running():
            await env.start_operator()
            await env.create(dsd("llm", planner={"pin": PIN_A}))
            # Every pod Ready (as the kubelet says; the operator's Ready condition waits for a resync).
            await eventually(lambda: env.status("llm").get("plan"), what="a plan")
            await eventually(
                lambda: (
                    (sets := env.api.items("apps/v1/statefulsets", NS))
                    and all(
                        (x.get("status") or {}).get("readyReplicas") == x["spec"]["replicas"] for x in sets
                    )
                ),
                timeout=60 + ready,
                what="every pod Ready",
            )
            (old,) = set(names(env.api, NS, "llm").values())
            start_tick = len(ctl.history)
            t0 = time.monotonic()
            await env.patch_spec("llm", {"planner": {"pin": PIN_B}})
            marks: dict[str, float] = {}

            def revisions() -> dict[str, Any]:
                return names(env.api, NS, "llm")

            def probe() -> bool:
                now = time.monotonic() - t0
                if "decision" not in marks and env.status("llm").get("rollout"):
                    marks["decision"] = now
                rollout = env.status("llm").get("rollout") or {}
                if "new ready" not in marks and rollout.get("step") in ("DrainingOld", "RemovingOld"):
                    marks["new ready"] = now
                sets = env.api.items("apps/v1/statefulsets", NS)
                olds = [
                    s for s in sets if (s["metadata"].get("labels") or {}).get("distserve.io/revision") == old
                ]
                if "old scaled to 0" not in marks and olds and all(s["spec"]["replicas"] == 0 for s in olds):
                    marks["old scaled to 0"] = now
                if "old gone" not in marks and "decision" in marks and old not in revisions().values():
                    marks["old gone"] = now
                return "old gone" in marks

            await eventually(probe, timeout=120 + 3 * ready, what="the old groups gone")
            during = ctl.history[start_tick:]
            fewest = min(min(r.values()) for _, r in during)
            return {**marks, "fewest ready instances": fewest, "ticks": len(during)}


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}; "
        f"resync {args.resync}s, rollout poll {args.poll}s, drain {args.drain}s, {args.runs} run(s) per readiness delay",
        flush=True,
    )
    rows = []
    for ready in args.ready:
        runs = []
        for i in range(args.runs):
            r = await run_once(ready, args.drain, args.resync, args.poll)
            runs.append(r)
            print(
                f"  ready {ready:g}s run {i + 1}: "
                + ", ".join(f"{k} {v:.2f}s" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
                flush=True,
            )
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in ("decision", "new ready", "old scaled to 0", "old gone")
        }
        baseline = ready + args.drain
        row = {
            "ready_s": ready,
            "drain_s": args.drain,
            **{f"{k} (median s)": round(v, 2) for k, v in med.items()},
            "baseline ready+drain s": baseline,
            "ratio old gone / baseline": round(med["old gone"] / baseline, 2),
            "fewest ready instances (any role, any tick)": min(r["fewest ready instances"] for r in runs),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ready", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="pod readiness delays, s"
    )
    parser.add_argument("--drain", type=float, default=1.0, help="drain time of a pod scaled away, s")
    parser.add_argument("--resync", type=float, default=60.0, help="operator resync period, s (its default)")
    parser.add_argument("--poll", type=float, default=5.0, help="rollout_poll_seconds (its default)")
    parser.add_argument("--runs", type=int, default=3, help="runs per readiness delay (medians)")
    parser.add_argument("--json", help="write the rows here")
    asyncio.run(main(parser.parse_args()))
