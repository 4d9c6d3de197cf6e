"""Simulated traffic: arrival times at unit rate (scaled per probe) and prompt/output lengths.

Everything is drawn once per plan from one `random.Random(seed)`, so every rate probe and every
candidate sees the same requests (common random numbers): attainment then moves only with the
rate and the configuration, never with sampling noise.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from distserve_operator import api

Z90 = 1.2815515655446004  # standard normal 90th percentile


@dataclass(frozen=True)
class Lengths:
    mean: float
    p90: float | None = None
    max: int | None = None
    distribution: api.LengthDistribution = api.LengthDistribution.FIXED

    @staticmethod
    def from_spec(t: api.TokenLengths) -> Lengths:
        return Lengths(t.mean, t.p90, t.max, t.distribution or api.LengthDistribution.FIXED)

    @staticmethod
    def observed(mean: float, p90: float | None) -> Lengths:
        if p90 is not None and p90 > mean * 1.01:
            return Lengths(mean, p90, None, api.LengthDistribution.LOG_NORMAL)
        return Lengths(mean)

    def sample(self, rng: random.Random, n: int) -> list[int]:
        d = self.distribution
        if d is api.LengthDistribution.FIXED:
            values = [self.mean] * n
        elif d is api.LengthDistribution.UNIFORM:
            hi = self.max or 2 * self.mean - 1
            lo = max(1.0, 2 * self.mean - hi)
            values = [rng.uniform(lo, hi) for _ in range(n)]
        elif d is api.LengthDistribution.EXPONENTIAL:
            values = [rng.expovariate(1 / self.mean) for _ in range(n)]
        else:
            mu, sigma = lognormal_params(self.mean, self.p90 or self.mean)
            values = [rng.lognormvariate(mu, sigma) for _ in range(n)]
        cap = self.max or 1 << 30
        return [min(cap, max(1, round(v))) for v in values]


def lognormal_params(mean: float, p90: float) -> tuple[float, float]:
    """mu, sigma with the given mean and 90th percentile: ln(p90/mean) = Z90*s - s^2/2."""
    gap = math.log(p90 / mean)
    disc = Z90 * Z90 - 2 * gap
    sigma = Z90 - math.sqrt(disc) if disc > 0 else Z90  # beyond that ratio no lognormal fits: widest
    return math.log(mean) - sigma * sigma / 2, sigma


@dataclass(frozen=True)
class Requests:
    unit_arrivals: tuple[float, ...]  # seconds at 1 request/s; divide by the rate
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.inputs)

    def arrivals(self, rate: float) -> list[float]:
        return [t / rate for t in self.unit_arrivals]

    @property
    def mean_input(self) -> float:
        return sum(self.inputs) / len(self.inputs)

    @property
    def mean_output(self) -> float:
        return sum(self.outputs) / len(self.outputs)


def unit_arrivals(rng: random.Random, n: int, arrival: api.ArrivalProcess, cv: float) -> list[float]:
    """Poisson: exponential gaps; Gamma: gaps with mean 1 and coefficient of variation `cv`."""
    t, out = 0.0, []
    shape = 1 / (cv * cv)
    for _ in range(n):
        t += (
            rng.expovariate(1.0)
            if arrival is api.ArrivalProcess.POISSON
            else rng.gammavariate(shape, 1 / shape)
        )
        out.append(t)
    return out


def generate(
    n: int,
    seed: int,
    inputs: Lengths,
    outputs: Lengths,
    arrival: api.ArrivalProcess = api.ArrivalProcess.POISSON,
    cv: float = 1.0,
    trace: list[tuple[int, int]] | None = None,
) -> Requests:
    rng = random.Random(seed)
    arrivals = unit_arrivals(rng, n, arrival, cv)
    if trace:
        # The trace's lengths in its own order, repeated when fewer rows than simulated requests.
        ins = [trace[i % len(trace)][0] for i in range(n)]
        outs = [trace[i % len(trace)][1] for i in range(n)]
    else:
        ins, outs = inputs.sample(rng, n), outputs.sample(rng, n)
    return Requests(tuple(arrivals), tuple(ins), tuple(outs))
