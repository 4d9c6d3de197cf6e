"""Least-squares fits of the planner's latency model to measured points.

Prefill: `a + b*tokens + c*sum(len^2)`; decode step: `a + b*ctx_tokens + c*batch`, one set per
range of batch sizes (DistServe's profiler fits two, split at a threshold; `fit_decode` splits
where the measurements say the kernels change). Coefficients are kept non-negative (a negative
cost per token would be unphysical and extrapolates badly), and rows are weighted by 1/measured
so a 5 ms point counts as much as a 500 ms one: the planner cares about relative error at every
size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distserve_planner.latency import NO_THRESHOLD, Abc, DecodeRange, decode_range_abc


@dataclass(frozen=True)
class PrefillPoint:
    lengths: tuple[int, ...]  # prompt lengths of one batch
    ms: float  # median wall time of the batch

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def sum_sq(self) -> int:
        return sum(n * n for n in self.lengths)


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    ctx_tokens: int  # context tokens over the whole batch
    ms: float  # median wall time of one step


@dataclass(frozen=True)
class FitError:
    mean_percent: float
    median_percent: float
    max_percent: float


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||x·c − y|| with c ≥ 0, by dropping the most negative column until none is (3 columns:
    at most 3 re-solves, no scipy needed)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _weighted_fit(rows: list[tuple[float, float, float]], ms: list[float]) -> Abc:
    x = np.array(rows, dtype=float)
    y = np.array(ms, dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    c = nonnegative_lstsq(x * w[:, None], y * w)
    return float(c[0]), float(c[1]), float(c[2])


def errors(predicted: Sequence[float], measured: Sequence[float]) -> FitError:
    rel = [abs(p - m) / m * 100 for p, m in zip(predicted, measured, strict=True) if m > 0]
    if not rel:
        return FitError(0.0, 0.0, 0.0)
    return FitError(float(np.mean(rel)), float(np.median(rel)), float(np.max(rel)))


def prefill_ms(c: Abc, p: PrefillPoint) -> float:
    return c[0] + c[1] * p.tokens + c[2] * p.sum_sq


def fit_prefill(points: Sequence[PrefillPoint]) -> tuple[Abc, FitError]:
    coef = _weighted_fit([(1.0, p.tokens, p.sum_sq) for p in points], [p.ms for p in points])
    return coef, errors([prefill_ms(coef, p) for p in points], [p.ms for p in points])


@dataclass(frozen=True)
class DecodeFit:
    ranges: tuple[DecodeRange, ...]  # ascending, the first from batch 1
    error: FitError

    def abc(self, batch: int) -> Abc:
        return decode_range_abc(self.ranges, batch)

    def ms(self, p: DecodePoint) -> float:
        a, b, c = self.abc(p.batch)
        return a + b * p.ctx_tokens + c * p.batch

    def scaled(self, k: float) -> DecodeFit:
        return DecodeFit(
            tuple((start, (a * k, b * k, c * k)) for start, (a, b, c) in self.ranges), self.error
        )

    def with_error(self, points: Sequence[DecodePoint]) -> DecodeFit:
        """The same coefficients, the error measured against `points`."""
        return DecodeFit(self.ranges, errors([self.ms(p) for p in points], [p.ms for p in points]))

    def describe(self) -> str:
        return " / ".join(
            format_abc(abc) + ("" if start == 1 else f" from batch {start}") for start, abc in self.ranges
        )


def format_abc(c: Abc) -> str:
    return f"({c[0]:.4g}, {c[1]:.4g}, {c[2]:.4g})"


def _fit_decode_once(points: Sequence[DecodePoint]) -> Abc:
    return _weighted_fit([(1.0, p.ctx_tokens, p.batch) for p in points], [p.ms for p in points])


def _fit_ranges(points: Sequence[DecodePoint], starts: Sequence[int]) -> DecodeFit | None:
    """One fit per range of batch sizes; None when a range holds fewer than two batch sizes (a
    line through one batch size would be fitting that size's noise)."""
    bounds = [*starts[1:], NO_THRESHOLD]
    ranges = []
    for start, end in zip(starts, bounds, strict=True):
        inside = [p for p in points if start <= p.batch < end]
        if len({p.batch for p in inside}) < 2:
            return None
        ranges.append((start, _fit_decode_once(inside)))
    return DecodeFit(tuple(ranges), NO_ERROR).with_error(points)


# Repeated timings of one step agree to about this much (mean %): a split that gains less is noise.
NOISE_PERCENT = 0.5


def fit_decode(points: Sequence[DecodePoint], min_gain: float = 0.2, max_ranges: int = 4) -> DecodeFit:
    """One set of coefficients, split into ranges of batch sizes while a split cuts the mean error
    by at least `min_gain` (greedy: each round adds the one split that helps most). The kernels
    behind a step change algorithm with the row count (see the planner's `PhaseCoefficients`), so
    a sweep over batch sizes is piecewise linear, not one line."""
    sizes = sorted({p.batch for p in points})
    best = _fit_ranges(points, [1]) if len(sizes) >= 2 else None
    if best is None:  # a single batch size: nothing to split, nor to tell batch from context
        return DecodeFit(((1, _fit_decode_once(points)),), NO_ERROR).with_error(points)
    while len(best.ranges) < max_ranges:
        starts = [start for start, _ in best.ranges]
        candidates = [
            fitted
            for t in sizes[1:]
            if t not in starts and (fitted := _fit_ranges(points, sorted([*starts, t]))) is not None
        ]
        if not candidates:
            break
        better = min(candidates, key=lambda f: f.error.mean_percent)
        gain = best.error.mean_percent - better.error.mean_percent
        if gain < best.error.mean_percent * min_gain or gain < NOISE_PERCENT:
            break
        best = better
    return best


NO_ERROR = FitError(0.0, 0.0, 0.0)
