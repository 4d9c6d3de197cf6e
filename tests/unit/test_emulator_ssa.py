"""The emulator's server-side apply (tests/operator_support/ssa.py) follows the API server's rules
that the operator relies on: it is what the operator's SSA tests are checked against."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support import ssa

RENDERED = {
    "apiVersion": "apps/v1",
    "kind": "StatefulSet",
    "metadata": {"name": "w", "labels": {"app": "llm", "tier": "gpu"}},
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {"containers": [{"name": "decode", "image": "w:1", "env": [{"name": "A", "value": "1"}]}]}
        },
    },
}


def _applied() -> tuple[dict, ssa.Managers]:
    return ssa.apply({}, RENDERED, {}, "op", force=False)


def test_a_field_left_out_is_removed_unless_another_manager_owns_it() -> None:
    live, managers = _applied()
    labelled = {
        **live,
        "metadata": {**live["metadata"], "labels": {**live["metadata"]["labels"], "team": "x"}},
    }
    managers = ssa.update(live, labelled, managers, "kubectl")
    # The operator stops rendering `tier` and the env var; the user's label is not the operator's.
    config = {
        **RENDERED,
        "metadata": {"name": "w", "labels": {"app": "llm"}},
        "spec": {
            **RENDERED["spec"],
            "template": {"spec": {"containers": [{"name": "decode", "image": "w:1"}]}},
        },
    }
    live, managers = ssa.apply(labelled, config, managers, "op", force=True)
    assert live["metadata"]["labels"] == {"app": "llm", "team": "x"}
    assert live["spec"]["template"]["spec"]["containers"] == [{"name": "decode", "image": "w:1"}]


def test_a_changed_field_another_manager_owns_conflicts_unless_forced() -> None:
    live, managers = _applied()
    scaled = {**live, "spec": {**live["spec"], "replicas": 7}}
    managers = ssa.update(live, scaled, managers, "hpa")
    with pytest.raises(ssa.Conflict, match=r'conflict with "hpa": spec.replicas'):
        ssa.apply(scaled, RENDERED, managers, "op", force=False)
    forced, after = ssa.apply(scaled, RENDERED, managers, "op", force=True)
    assert forced["spec"]["replicas"] == 2 and ("hpa", "Update") not in after
    # Leaving the field out instead keeps the autoscaler's count.
    kept, _ = ssa.apply(
        scaled, {**RENDERED, "spec": {"template": RENDERED["spec"]["template"]}}, managers, "op", force=True
    )
    assert kept["spec"]["replicas"] == 7


def test_items_of_keyed_lists_merge_by_name_and_fields_v1_names_them() -> None:
    live, managers = _applied()
    sidecar = {"name": "mesh-proxy", "image": "envoy:1"}
    injected = {
        **live,
        "spec": {
            **live["spec"],
            "template": {"spec": {"containers": [*live["spec"]["template"]["spec"]["containers"], sidecar]}},
        },
    }
    managers = ssa.update(live, injected, managers, "mesh")
    again, managers = ssa.apply(injected, RENDERED, managers, "op", force=True)
    assert [c["name"] for c in again["spec"]["template"]["spec"]["containers"]] == ["decode", "mesh-proxy"]
    (entry,) = [e for e in ssa.managed_fields(managers, "apps/v1") if e["manager"] == "op"]
    containers = entry["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert set(containers) == {'k:{"name":"decode"}'} and containers['k:{"name":"decode"}']["."] == {}
