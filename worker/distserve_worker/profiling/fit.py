"""Least-squares fits of the planner's latency model to measured points.

Prefill: `a + b*tokens + c*sum(len^2)`; decode step: `a + b*ctx_tokens + c*batch`, optionally a
second set from a batch-size threshold on (as DistServe's profiler fits). Coefficients are kept
non-negative (a negative cost per token would be unphysical and extrapolates badly), and rows are
weighted by 1/measured so a 5 ms point counts as much as a 500 ms one: the planner cares about
relative error at every size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Abc = tuple[float, float, float]
NO_THRESHOLD = 1 << 30


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
    small: Abc
    large: Abc
    threshold: int
    error: FitError

    def ms(self, p: DecodePoint) -> float:
        a, b, c = self.large if p.batch >= self.threshold else self.small
        return a + b * p.ctx_tokens + c * p.batch


def _fit_decode_once(points: Sequence[DecodePoint]) -> Abc:
    return _weighted_fit([(1.0, p.ctx_tokens, p.batch) for p in points], [p.ms for p in points])


def fit_decode(points: Sequence[DecodePoint], min_gain: float = 0.2) -> DecodeFit:
    """One set of coefficients, or two split at a batch size when that cuts the mean error by at
    least `min_gain` (a split needs two batch sizes on each side, so it is not fitting noise)."""
    measured = [p.ms for p in points]
    one = _fit_decode_once(points)
    best = DecodeFit(one, one, NO_THRESHOLD, NO_ERROR)
    best = DecodeFit(one, one, NO_THRESHOLD, errors([best.ms(p) for p in points], measured))
    sizes = sorted({p.batch for p in points})
    for t in sizes[2:-1]:
        lo = [p for p in points if p.batch < t]
        hi = [p for p in points if p.batch >= t]
        if len({p.batch for p in hi}) < 2:
            continue
        cand = DecodeFit(_fit_decode_once(lo), _fit_decode_once(hi), t, NO_ERROR)
        err = errors([cand.ms(p) for p in points], measured)
        if err.mean_percent < best.error.mean_percent * (1 - min_gain):
            best = DecodeFit(cand.small, cand.large, t, err)
    return best


NO_ERROR = FitError(0.0, 0.0, 0.0)
