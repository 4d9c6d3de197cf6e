"""The Grafana dashboard the chart ships (charts/distserve/dashboards/distserve.json) cannot drift
from the code: every series its PromQL reads is one the router, the workers or the operator
registers (read from their Prometheus registries, not from a list kept here), used as its type
allows, and the JSON is a Grafana dashboard model whose variables are all defined."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from distserve_operator.metrics import OperatorMetrics
from distserve_worker.metrics import RuntimeMetrics

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "charts" / "distserve" / "dashboards" / "distserve.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The series prometheus_client exposes per metric type (family names carry no _total).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
}
PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "group", "stddev", "stdvar",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "histogram_quantile",
    "clamp_min", "clamp_max", "clamp", "abs", "ceil", "floor", "round", "vector", "scalar", "absent",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time",
    "label_replace", "label_join", "sort", "sort_desc", "time", "timestamp",
}  # fmt: skip
METRIC_MODULES = {"worker/distserve_worker/metrics.py", "operator/distserve_operator/metrics.py"}


def registered_series() -> dict[str, str]:
    """Series name -> metric type, of everything the router (and workers) and the operator register:
    the runtime's registry is the one `RuntimeMetrics` builds for every role (router/app.py,
    serving.py, colocated.py), the operator's the one `OperatorMetrics` serves."""
    registries: list[CollectorRegistry] = [
        RuntimeMetrics("router", "m").registry,
        RuntimeMetrics("decode", "m", "10.0.0.1:50052").registry,
        OperatorMetrics().registry,
    ]
    series = {}
    for registry in registries:
        for family in registry.collect():
            for suffix in SUFFIXES[family.type]:
                series[family.name + suffix] = family.type
    return series


def test_metrics_are_registered_only_where_this_test_looks() -> None:
    """A metric class used in another module would escape the check below: it must be added there."""
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"")
    found = {
        str(path.relative_to(ROOT))
        for top in ("operator", "worker")
        for path in (ROOT / top).rglob("*.py")
        if "prometheus_client" in (text := path.read_text()) and pattern.search(text)
    }
    assert found == METRIC_MODULES


# ---------------------------------------------------------------------------- PromQL


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_uses(expr: str) -> Iterator[tuple[str, bool, str | None]]:
    """(series name, read over a range [..], its label matchers or None) per vector selector."""
    text = _strip_strings(expr)
    matchers = [m.group(1) for m in re.finditer(r"\{([^}]*)\}", expr)]
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    # Label lists of grouping and matching clauses are not series.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    braces = iter(matchers)
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        name, rest = m.group(0), text[m.end() :].lstrip()
        if name in PROMQL_KEYWORDS:
            continue
        if rest.startswith("("):
            assert name in PROMQL_FUNCTIONS, f"{name}( is not a PromQL function: {expr}"
            continue
        selector = next(braces) if rest.startswith("{}") else None
        ranged = rest.removeprefix("{}").lstrip().startswith("[]")
        yield name, ranged, selector


def label_values_expr(query: str) -> str:
    """The series selector of a templating query `label_values(<selector>, <label>)`."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip(), re.S)
    assert m, f"templating query is not label_values(series, label): {query}"
    return m.group(1)


def test_promql_parsing_finds_series_ranges_and_matchers() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, role) (rate(a_bucket{x="1", y=~"$v"}[$__rate_interval])))'
        " / on (role) group_left max(b) * 1e3"
    )
    assert list(metric_uses(expr)) == [("a_bucket", True, 'x="1", y=~"$v"'), ("b", False, None)]
    with pytest.raises(AssertionError, match="not a PromQL function"):
        list(metric_uses("rates(a[5m])"))


# ---------------------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def all_panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def panel_targets(d: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for p in all_panels(d):
        for t in p.get("targets", []):
            yield p, t


def annotation_queries(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in d["annotations"]["list"] if not a.get("builtIn")]


def every_expr(d: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for _, t in panel_targets(d)]
    for a in annotation_queries(d):
        exprs.append(a["expr"])
        if "target" in a:
            exprs.append(a["target"]["expr"])
    exprs += [label_values_expr(v["query"]) for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_series_the_dashboard_reads_is_registered_and_used_as_its_type_allows() -> None:
    series = registered_series()
    uses = [(expr, use) for expr in every_expr(dashboard()) for use in metric_uses(expr)]
    assert uses
    for expr, (name, ranged, _) in uses:
        assert name in series, f"{name} is not a metric the router, workers or operator export: {expr}"
        kind = series[name]
        if ranged:  # rate()/increase() of a gauge is meaningless
            assert kind != "gauge", f"{name} is a gauge, read over a range: {expr}"
        if name.endswith("_bucket"):
            assert kind == "histogram" and "histogram_quantile(" in expr, expr
    for expr in every_expr(dashboard()):
        for quantile in re.finditer(r"histogram_quantile\([\d.]+,\s*sum by \(([^)]*)\)", expr):
            assert "le" in re.split(r"\s*,\s*", quantile.group(1)), f"quantile not by le: {expr}"
        assert "histogram_quantile(" not in expr or "_bucket" in expr, expr


def test_every_panel_query_selects_one_deployment_of_the_row() -> None:
    d = dashboard()
    (row,) = [p for p in d["panels"] if p["type"] == "row"]
    assert row["repeat"] == "deployment"
    for panel, t in panel_targets(d):
        for name, _, selector in metric_uses(t["expr"]):
            assert selector is not None, f"{panel['title']}: {name} has no label matchers"
            matchers = {m.strip() for m in selector.split(",")}
            assert {'deployment="$deployment"', 'namespace=~"$namespace"'} <= matchers, (
                f"{panel['title']}: {name}{{{selector}}} would mix deployments in one row"
            )


def test_legends_name_only_labels_the_query_keeps() -> None:
    for panel, t in panel_targets(dashboard()):
        kept = {
            label.strip()
            for clause in re.findall(r"\bby \(([^)]*)\)", t["expr"])
            for label in clause.split(",")
        }
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
            assert label in kept, f"{panel['title']}: legend {{{{{label}}}}} is aggregated away"


def test_it_loads_as_a_grafana_dashboard_model() -> None:
    d = dashboard()
    assert d["uid"] and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 39
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["datasource"] == DATASOURCE, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", DATASOURCE) == DATASOURCE and t["expr"].strip(), p["title"]
    for a in annotation_queries(d):
        assert a["datasource"] == DATASOURCE, a["name"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["deployment"]["type"] == "query"
    assert variables["deployment"]["datasource"] == DATASOURCE


def test_panels_fit_the_grid_without_overlapping() -> None:
    boxes = [p["gridPos"] for p in all_panels(dashboard())]
    for box in boxes:
        assert box["x"] >= 0 and box["w"] > 0 and box["x"] + box["w"] <= 24, box
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, (a, b)


def test_every_variable_used_is_defined() -> None:
    d = dashboard()
    defined = {v["name"] for v in d["templating"]["list"]} | GRAFANA_VARIABLES
    texts = every_expr(d) + [p["title"] for p in all_panels(d)]
    texts += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    used = {
        m.group(1) or m.group(2)
        for text in texts
        for m in re.finditer(r"\$(?:(\w+)|\{(\w+)(?::\w+)?\})", text)
    }
    assert used and used <= defined, used - defined
