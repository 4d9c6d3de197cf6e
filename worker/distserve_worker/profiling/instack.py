"""Profiling inside the running stack: start the local stack (router, one prefill and one decode
process, as `distserve up`), drive it with open-loop load at a ramp of rates, read back every
forward the workers timed (`GET /forwards`), and scale the profile measured alone to them.

Why: a forward timed alone (`measure.py`) runs on a core of its own. In the stack the same forward
shares the machine with the other worker, the router, the clients, gRPC and KV transfer; on the
2-core dev box that made prefill forwards and decode steps about 20% slower than the isolated profile
said, and the simulator's predictions inherited the error. Fitted to these timings, the profile
describes the deployment as it runs.

The factor is busy-time weighted (sum of measured over sum of predicted, over every forward), not
a median of ratios: contention grows with load (the other worker, the router and the clients are
busier), and the forwards at high load are the many and long ones that decide where the stack
saturates. Measured at 1.9 req/s, decode steps ran 1.27x their isolated cost; the median over a
ramp that mostly idles said 1.09x, and the simulator's goodput came out 78% high.

Why scale rather than refit: a serving run covers the shapes its traffic has (mostly short single
prompts, decode batches of whatever size the load made), so a free three-coefficient fit to it
extrapolates badly (tried: it put prefill cost on the squared term and predicted 9 s for a
512-token prompt that takes 1.4 s). The shape of the cost comes from the sweep alone; the stack
supplies one factor per phase: the median of measured / predicted over its forwards.

Points are medians per shape bucket (prefill: rows x longest prompt; decode: rows x attended
context), so a single preempted forward does not pull the fit.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from distserve_planner.workload import Lengths, generate
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec
from distserve_worker.profiling.fit import (
    Abc,
    DecodeFit,
    DecodePoint,
    FitError,
    PrefillPoint,
    errors,
    prefill_ms,
)
from distserve_worker.testing.load import run_load, token_range
from distserve_worker.testing.quiet import wait_quiet

PREFILL_WIDTH_BUCKET = 16  # prompt tokens
DECODE_WIDTH_BUCKET = 32  # context tokens


@dataclass(frozen=True)
class Calibration:
    rates: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)  # requests/s, each for `seconds`
    seconds: float = 20.0
    # The ramp's traffic. How much one worker slows the other on shared cores depends on it (small
    # forwards are bound by memory bandwidth, which both processes draw on): calibrate with the
    # lengths the deployment will serve (`distserve profile --in-stack -f MANIFEST`).
    inputs: Lengths = field(default_factory=lambda: Lengths(64))
    outputs: Lengths = field(default_factory=lambda: Lengths(32))
    token_budget: int = 512
    max_batch: int = 32
    seed: int = 1000  # not a seed the fidelity benchmark uses
    vocab: int = 49152
    # How long to wait for a quiet machine before each rate (then it measures anyway, and says so).
    quiet_timeout_s: float = 300.0


@dataclass(frozen=True)
class StackForwards:
    prefill: list[tuple[int, int, float]]  # (rows, longest prompt, ms) per forward
    decode: list[tuple[int, int, float]]  # (rows, attended context, ms) per step

    def prefill_points(self) -> list[PrefillPoint]:
        # A padded batch computes rows x the longest prompt: that is the shape it costs.
        return [PrefillPoint((w,) * rows, ms) for rows, w, ms in _buckets(self.prefill, PREFILL_WIDTH_BUCKET)]

    def decode_points(self) -> list[DecodePoint]:
        return [DecodePoint(rows, rows * w, ms) for rows, w, ms in _buckets(self.decode, DECODE_WIDTH_BUCKET)]


def calibrate(model: ModelSpec, threads: int, cal: Calibration, progress: bool = True) -> StackForwards:
    """Every forward the stack's workers timed under the ramp."""
    config = StackConfig(
        model,
        prefill=1,
        decode=1,
        threads=threads,
        prefill_args=["--token-budget", str(cal.token_budget)],
        decode_args=["--max-batch", str(cal.max_batch)],
    )
    with LocalStack(config) as stack:
        _say(progress, "starting the local stack (router, 1 prefill, 1 decode)")
        stack.wait_ready(timeout=300)
        for k, rate in enumerate(cal.rates):
            # Someone else's work would be calibrated in as contention.
            wait_quiet(timeout_s=cal.quiet_timeout_s, label="[distserve]")
            n = max(1, round(rate * cal.seconds))
            reqs = generate(n, cal.seed + k, cal.inputs, cal.outputs)
            results, wall = asyncio.run(
                run_load(
                    stack.url,
                    model.name,
                    reqs.arrivals(rate),
                    list(reqs.inputs),
                    list(reqs.outputs),
                    cal.seed + k,
                    token_range(cal.vocab),
                )
            )
            ok = sum(r.ok for r in results)
            errors = sorted({r.error for r in results if not r.ok})
            _say(
                progress,
                f"rate {rate} req/s: {ok}/{n} requests answered in {wall:.0f} s"
                + (f" (errors: {'; '.join(errors)[:300]})" if errors else ""),
            )
        return StackForwards(
            _fetch(stack.proc("prefill-0").http_port), _fetch(stack.proc("decode-0").http_port)
        )


@dataclass(frozen=True)
class StackFit:
    """The isolated fit scaled to the stack, its errors measured against the stack's forwards."""

    prefill: Abc
    prefill_error: FitError
    decode: DecodeFit
    prefill_factor: float
    decode_factor: float
    prefill_points: list[PrefillPoint]  # the stack's forwards, bucketed
    decode_points: list[DecodePoint]


# A forward this many times slower than predicted was preempted (or collected garbage), not
# contended: left out of the factor.
OUTLIER = 5.0


def fit_to_stack(prefill: Abc, decode: DecodeFit, forwards: StackForwards) -> StackFit:
    """The isolated fit, each phase multiplied by its busy-time weighted measured/predicted."""
    pre = [(ms, prefill_ms(prefill, PrefillPoint((w,) * rows, ms))) for rows, w, ms in forwards.prefill]
    dec = [(ms, decode.ms(DecodePoint(rows, rows * w, ms))) for rows, w, ms in forwards.decode]
    fp, fd = _weighted_ratio(pre), _weighted_ratio(dec)
    scaled = (prefill[0] * fp, prefill[1] * fp, prefill[2] * fp)
    prefill_points, decode_points = forwards.prefill_points(), forwards.decode_points()
    return StackFit(
        scaled,
        errors([prefill_ms(scaled, p) for p in prefill_points], [p.ms for p in prefill_points]),
        decode.scaled(fd).with_error(decode_points),
        fp,
        fd,
        prefill_points,
        decode_points,
    )


def _weighted_ratio(pairs: list[tuple[float, float]]) -> float:
    kept = [(m, p) for m, p in pairs if p > 0 and m / p <= OUTLIER]
    return sum(m for m, _ in kept) / sum(p for _, p in kept) if kept else 1.0


def _fetch(port: int) -> list[tuple[int, int, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/forwards", timeout=10) as response:
        body = json.load(response)
    return [(int(r), int(w), float(ms)) for r, w, ms in body["forwards"]]


def _buckets(samples: list[tuple[int, int, float]], width: int) -> list[tuple[int, int, float]]:
    """(rows, median width, median ms) per (rows, width bucket)."""
    groups: dict[tuple[int, int], list[tuple[int, float]]] = defaultdict(list)
    for rows, w, ms in samples:
        groups[(rows, w // width)].append((w, ms))
    return [
        (rows, round(statistics.median(w for w, _ in g)), statistics.median(ms for _, ms in g))
        for (rows, _), g in sorted(groups.items())
    ]


def _say(progress: bool, line: str) -> None:
    if progress:
        print(f"[profile] {line}", file=sys.stderr, flush=True)
