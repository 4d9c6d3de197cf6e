"""Placement search against brute force on random small clusters: how often the search's pick falls
short of the best deployment in its space, and what the search costs against enumerating it.

Each case draws a model (OPT-13B, Llama-3-8B, OPT-66B), nodes of 2-8 A100-80GB, 1-4 nodes, a rate,
TTFT/TPOT SLOs, an inter-node link and a prompt length; both algorithms (High, Low affinity) are
searched and brute-forced with the same per-instance rates (tests/planner_support/brute.py), and the
pick compared with the best by (serves the rate, goodput per GPU). The baseline measured in the same
run is the brute force's own time.

    .venv/bin/python benchmarks/placement_search.py [--cases 160] [--seed 1]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from planner_support.brute import best_of, brute_high, brute_low, case_input, context  # noqa: E402

from distserve_planner.placement import choose, high_affinity, low_affinity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=160)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}; {args.cases} cases, seed {args.seed}"
    )
    misses, compared, ratios = 0, 0, []
    search_s, brute_s = [], []
    for n in range(args.cases):
        model = rng.choice(["opt-13b", "llama-3-8b", "opt-66b"])
        g = 8 if model == "opt-66b" else rng.choice([2, 4, 8])
        nodes = rng.choice([1, 2, 3, 4])
        rate = float(rng.choice([1, 3, 10, 30, 100]))
        ttft, tpot = rng.choice([100, 200, 400, 1000, 2500]), rng.choice([20, 40, 80, 150])
        inter, inputs = rng.choice([3e9, 12.5e9, 25e9, 50e9]), rng.choice([128, 512, 1024])
        inp = case_input(model, g, nodes, rate, ttft, tpot, inter=inter, inputs=inputs)
        ctx, shape = context(inp), inp.cluster
        for search, brute in ((high_affinity, brute_high), (low_affinity, brute_low)):
            # Per-instance rates are cached in ctx by the first to ask: warm them so that both
            # timings below are the placement enumeration's own.
            list(brute(ctx, shape, rate))
            started = time.perf_counter()
            found, _ = search(ctx, shape, rate)
            ranked = choose(found, rate, lambda p: 0.0, tie=False).plans
            search_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            every = list(brute(ctx, shape, rate))
            brute_s.append(time.perf_counter() - started)
            if not every:
                continue
            compared += 1
            best = best_of(every, rate)
            pick = ranked[0] if ranked else None
            ratio = pick.per_gpu / best.per_gpu if pick and best.per_gpu else 0.0
            ratios.append(ratio)
            if pick is None or pick.serves(rate) != best.serves(rate) or ratio < 0.999:
                misses += 1
                print(f"  miss in case {n}: {model} {g}x{nodes} {rate:g} req/s: {ratio:.3f} of the best")
        if (n + 1) % 40 == 0:
            print(f"  {n + 1}/{args.cases} cases", file=sys.stderr)
    print(
        f"compared {compared} (case, affinity) pairs with feasible plans: {misses} where the pick is below the best"
    )
    print(f"pick / best goodput per GPU: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}")
    s, b = statistics.median(search_s), statistics.median(brute_s)
    print(
        f"placement enumeration, median per case: search {s * 1e3:.2f} ms, brute force {b * 1e3:.2f} ms ({b / s:.1f}x)"
    )


if __name__ == "__main__":
    main()
