"""Parsing router metrics and turning two scrapes into a workload (pure)."""

from __future__ import annotations

import pytest

from distserve_operator import observe

TEXT = """
# HELP distserve_requests_total Requests.
# TYPE distserve_requests_total counter
distserve_requests_total{model="m",instance="a"} {req_a}
distserve_requests_total{model="m",instance="b"} {req_b}
# TYPE distserve_slo_attained_total counter
distserve_slo_attained_total{model="m"} {att}
# TYPE distserve_slo_missed_total counter
distserve_slo_missed_total{model="m"} {miss}
# TYPE distserve_queue_requests gauge
distserve_queue_requests{role="prefill"} 4
# TYPE distserve_request_prompt_tokens histogram
distserve_request_prompt_tokens_bucket{le="100"} {p100}
distserve_request_prompt_tokens_bucket{le="1000"} {p1000}
distserve_request_prompt_tokens_bucket{le="+Inf"} {pinf}
distserve_request_prompt_tokens_sum {psum}
distserve_request_prompt_tokens_count {pinf}
"""


def _text(**v: float) -> str:
    out = TEXT
    for key, value in v.items():
        out = out.replace("{" + key + "}", str(value))
    return out


def test_scrape_sums_series_over_labels() -> None:
    s = observe.parse_router_metrics(
        _text(req_a=10, req_b=5, att=12, miss=3, p100=5, p1000=15, pinf=15, psum=4000), 1.0
    )
    assert s.requests == 15
    assert (s.attained, s.missed) == (12, 3)
    assert s.prompt.count == 15 and s.prompt.buckets[100.0] == 5


def test_workload_between_two_scrapes() -> None:
    a = observe.parse_router_metrics(
        _text(req_a=100, req_b=0, att=90, miss=10, p100=0, p1000=100, pinf=100, psum=50000), 0.0
    )
    b = observe.parse_router_metrics(
        _text(req_a=300, req_b=0, att=270, miss=30, p100=0, p1000=300, pinf=300, psum=150000), 10.0
    )
    w = observe.workload_between(a, b, now="t")
    assert w is not None
    assert w.requests_per_second == pytest.approx(20.0)
    assert w.input_tokens_mean == pytest.approx(500.0)
    assert 100 < (w.input_tokens_p90 or 0) <= 1000
    assert w.attainment_percent == pytest.approx(90.0)
    assert w.window_seconds == 10


def test_counter_reset_yields_no_workload() -> None:
    a = observe.parse_router_metrics(
        _text(req_a=100, req_b=0, att=0, miss=0, p100=0, p1000=0, pinf=0, psum=0), 0.0
    )
    b = observe.parse_router_metrics(
        _text(req_a=5, req_b=0, att=0, miss=0, p100=0, p1000=0, pinf=0, psum=0), 5.0
    )
    assert observe.workload_between(a, b) is None
    assert observe.workload_between(a, a) is None  # no time elapsed


def test_histogram_quantile_interpolates_like_promql() -> None:
    h = observe.Histogram({10.0: 50, 20.0: 100, float("inf"): 100}, 1000, 100)
    assert h.quantile(0.5) == pytest.approx(10.0)
    assert h.quantile(0.9) == pytest.approx(18.0)
    assert observe.Histogram().quantile(0.9) is None


def test_prometheus_queries_and_responses() -> None:
    qs = observe.prometheus_queries('namespace="ns",service="llm"', 300)
    assert (
        qs["requests_per_second"] == 'sum(rate(distserve_requests_total{namespace="ns",service="llm"}[300s]))'
    )
    assert "histogram_quantile(0.9" in qs["input_tokens_p90"]
    ok = {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "12.5"]}]},
    }
    assert observe.prometheus_scalar(ok) == 12.5
    assert observe.prometheus_scalar({"status": "success", "data": {"result": []}}) is None
    assert (
        observe.prometheus_scalar({"status": "success", "data": {"result": [{"value": [1, "NaN"]}]}}) is None
    )
    w = observe.workload_from_prometheus(
        {"requests_per_second": 3.0, "attainment_percent": 101.0}, 300, now="t"
    )
    assert w is not None and w.requests_per_second == 3.0 and w.attainment_percent == 100.0
    assert observe.workload_from_prometheus({"requests_per_second": None}, 300) is None
