"""Observed traffic from the router's metrics (pure parsing; the HTTP GET is `Kube.get_text`, driven by
`reconcile.read_traffic`).

The router exports cumulative counters and histograms (DESIGN.md, "Metric names"). Two scrapes
give a window: the request rate is the counter delta over the elapsed time, length means are
histogram sum/count deltas, p90s are interpolated from bucket deltas. With Prometheus the same
quantities come from `rate()` / `histogram_quantile()` over the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .api import WorkloadSnapshot

REQUESTS = "distserve_requests"
PROMPT = "distserve_request_prompt_tokens"
OUTPUT = "distserve_request_output_tokens"
TTFT = "distserve_ttft_seconds"
TPOT = "distserve_tpot_seconds"
ATTAINED = "distserve_slo_attained"
MISSED = "distserve_slo_missed"


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets (upper bound -> count), summed over every label set."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(
            {le: c - earlier.buckets.get(le, 0.0) for le, c in self.buckets.items()},
            self.sum - earlier.sum,
            self.count - earlier.count,
        )

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding the q-th observation (as PromQL does)."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for le in sorted(self.buckets):
            count = self.buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower_bound
                if count == lower_count:
                    return le
                return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = le, count
        return lower_bound


@dataclass(frozen=True)
class RouterScrape:
    """One scrape of the router's cumulative metrics."""

    time: float  # monotonic seconds
    requests: float = 0.0
    attained: float = 0.0
    missed: float = 0.0
    prompt: Histogram = field(default_factory=Histogram)
    output: Histogram = field(default_factory=Histogram)


def parse_router_metrics(text: str, time: float) -> RouterScrape:
    """Parse Prometheus text exposition; series of one name are summed over their labels."""
    counters: dict[str, float] = {}
    hists: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" or name.endswith("_total"):
                base = name.removesuffix("_total").removesuffix("_created")
                if name.endswith("_created"):
                    continue
                counters[base] = counters.get(base, 0.0) + sample.value
            elif family.type == "histogram":
                h = hists.setdefault(family.name, {"buckets": {}, "sum": 0.0, "count": 0.0})
                if name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + sample.value
                elif name.endswith("_sum"):
                    h["sum"] += sample.value
                elif name.endswith("_count"):
                    h["count"] += sample.value

    def hist(name: str) -> Histogram:
        h = hists.get(name)
        return Histogram(dict(h["buckets"]), h["sum"], h["count"]) if h else Histogram()

    return RouterScrape(
        time=time,
        requests=counters.get(REQUESTS, 0.0),
        attained=counters.get(ATTAINED, 0.0),
        missed=counters.get(MISSED, 0.0),
        prompt=hist(PROMPT),
        output=hist(OUTPUT),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def workload_between(
    earlier: RouterScrape, later: RouterScrape, *, now: str | None = None
) -> WorkloadSnapshot | None:
    """The workload served between two scrapes; None when it cannot be told (reset, no time)."""
    seconds = later.time - earlier.time
    if seconds <= 0:
        return None
    d_requests = later.requests - earlier.requests
    d_attained = later.attained - earlier.attained
    d_missed = later.missed - earlier.missed
    if d_requests < 0 or d_attained < 0 or d_missed < 0 or later.prompt.count < earlier.prompt.count:
        return None  # a counter went back: the router restarted (or another replica answered)
    prompt = later.prompt.minus(earlier.prompt)
    output = later.output.minus(earlier.output)
    judged = d_attained + d_missed
    return WorkloadSnapshot(
        requests_per_second=round(d_requests / seconds, 6),
        input_tokens_mean=_round(prompt.mean),
        input_tokens_p90=_round(prompt.quantile(0.9)),
        output_tokens_mean=_round(output.mean),
        output_tokens_p90=_round(output.quantile(0.9)),
        attainment_percent=round(100.0 * d_attained / judged, 3) if judged > 0 else None,
        window_seconds=max(0, round(seconds)),
        time=now or _now(),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------------------- Prometheus


def prometheus_queries(selector: str, window_seconds: int) -> dict[str, str]:
    """PromQL per WorkloadSnapshot field over the window (`selector`: label matchers, no braces)."""
    w = f"[{window_seconds}s]"

    def rate(metric: str) -> str:
        return f"sum(rate({metric}{{{selector}}}{w}))"

    def p90(metric: str) -> str:
        return f"histogram_quantile(0.9, sum by (le) (rate({metric}_bucket{{{selector}}}{w})))"

    return {
        "requests_per_second": rate("distserve_requests_total"),
        "input_tokens_mean": f"{rate(PROMPT + '_sum')} / {rate(PROMPT + '_count')}",
        "input_tokens_p90": p90(PROMPT),
        "output_tokens_mean": f"{rate(OUTPUT + '_sum')} / {rate(OUTPUT + '_count')}",
        "output_tokens_p90": p90(OUTPUT),
        "attainment_percent": (
            f"100 * {rate('distserve_slo_attained_total')} / "
            f"({rate('distserve_slo_attained_total')} + {rate('distserve_slo_missed_total')})"
        ),
    }


def prometheus_scalar(response: Any) -> float | None:
    """The single value of an instant-vector query response, or None (no data, NaN)."""
    try:
        if response.get("status") != "success":
            return None
        result = response["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def workload_from_prometheus(
    values: dict[str, float | None], window_seconds: int, *, now: str | None = None
) -> WorkloadSnapshot | None:
    rate = values.get("requests_per_second")
    if rate is None:
        return None

    def get(key: str) -> float | None:
        v = values.get(key)
        return None if v is None else round(max(v, 0.0), 3)

    attainment = get("attainment_percent")
    return WorkloadSnapshot(
        requests_per_second=round(max(rate, 0.0), 6),
        input_tokens_mean=get("input_tokens_mean"),
        input_tokens_p90=get("input_tokens_p90"),
        output_tokens_mean=get("output_tokens_mean"),
        output_tokens_p90=get("output_tokens_p90"),
        attainment_percent=None if attainment is None else min(attainment, 100.0),
        window_seconds=window_seconds,
        time=now or _now(),
    )
