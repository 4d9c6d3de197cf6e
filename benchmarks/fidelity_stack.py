"""The measured side: start the real local stack once, warm it up, then drive it with the same
request list at each rate in turn (open-loop Poisson, see distserve_worker/testing/load.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass

from distserve_planner.workload import Requests
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.testing.load import TOKEN_RANGE, Measured, run_load
from distserve_worker.testing.quiet import Quiet, wait_quiet


@dataclass(frozen=True)
class RateRun:
    results: list[Measured]  # in request order
    wall_s: float
    load_1m: float  # 1-minute load average after the run (our stack included)
    before: Quiet  # the machine just before the run, our stack idle

    def describe(self) -> dict[str, object]:
        """The run's conditions, for the JSON summaries."""
        return {
            "wallSeconds": round(self.wall_s, 1),
            "loadAverage1m": round(self.load_1m, 2),
            "busyCoresBefore": self.before.busy_cores,
            "quietBefore": self.before.quiet,
        }


def measure_rates(
    config: StackConfig,
    reqs: Requests,
    rates: list[float],
    seed: int,
    label: str = "",
    lone: tuple[int, int] | None = None,
    *,
    ids: tuple[int, int] = TOKEN_RANGE,
    quiet_timeout_s: float = 300.0,
) -> tuple[list[Measured], list[RateRun]]:
    """(lone, per rate). Lone: 3 requests of `lone` (prompt, output) tokens one after another on the
    idle stack, the floor any load adds to. Each rate starts once the machine is quiet (or after
    `quiet_timeout_s`). Prompts are token ids drawn from `ids` (the model's ordinary vocabulary)."""
    out = []
    alone: list[Measured] = []
    # A SIGTERM (timeout, Ctrl-C from make) must still stop the workers: they run in their own
    # sessions, so only LocalStack.stop() reaches them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with LocalStack(config) as stack:
        stack.wait_ready(timeout=300)
        # Warm-up: first forwards allocate and pick kernels; not part of any measurement.
        warm, _ = asyncio.run(
            run_load(stack.url, config.model.name, [0.0, 0.0], [32, 96], [8, 8], seed=99, ids=ids)
        )
        if not all(m.ok for m in warm):
            raise RuntimeError(f"warm-up requests failed: {[m.error for m in warm]}")
        for k in range(3 if lone else 0):
            wait_quiet(timeout_s=quiet_timeout_s)
            assert lone is not None
            one, _ = asyncio.run(
                run_load(stack.url, config.model.name, [0.0], [lone[0]], [lone[1]], seed=k, ids=ids)
            )
            alone.extend(one)
        for rate in rates:
            before = wait_quiet(timeout_s=quiet_timeout_s)
            started = time.perf_counter()
            meas, wall = asyncio.run(
                run_load(
                    stack.url,
                    config.model.name,
                    reqs.arrivals(rate),
                    list(reqs.inputs),
                    list(reqs.outputs),
                    seed,
                    ids,
                )
            )
            load = os.getloadavg()[0]
            ok = sum(m.ok for m in meas)
            errors = {m.error for m in meas if not m.ok}
            print(
                f"[bench] {label} rate {rate:.3f}: {ok}/{len(meas)} ok in {time.perf_counter() - started:.0f} s "
                f"(load {load:.2f}; {before.busy_cores:.2f} cores busy before)"
                f"{' errors: ' + '; '.join(sorted(errors))[:300] if errors else ''}",
                file=sys.stderr,
                flush=True,
            )
            out.append(RateRun(meas, wall, load, before))
            time.sleep(2.0)  # every request has finished; let the caches be released
    return alone, out
