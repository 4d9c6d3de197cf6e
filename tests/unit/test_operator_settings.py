"""Operator settings, the kube helpers that need no server, metrics and the CLI entry (pure)."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from distserve_operator import cli_operator, kube
from distserve_operator.metrics import OperatorMetrics
from distserve_operator.settings import OperatorSettings


def test_settings_from_env_and_flags() -> None:
    s = OperatorSettings.from_env(
        {"DISTSERVE_OPERATOR_METRICS_PORT": "9200", "DISTSERVE_OPERATOR_PLANNER_WORKERS": "3"}
    )
    assert (s.metrics_port, s.planner_workers) == (9200, 3)
    s = OperatorSettings.from_env({"DISTSERVE_OPERATOR_METRICS_PORT": "off"}, planner_workers=4)
    assert s.metrics_port is None and s.planner_workers == 4
    with pytest.raises(ValidationError):
        OperatorSettings.from_env({"DISTSERVE_OPERATOR_PLANNER_WORKERS": "0"})
    s = OperatorSettings.from_env({"DISTSERVE_OPERATOR_PLANNER_PROCESSES": "auto"})
    assert s.planner_processes is None and s.plan_cache_size == 256 and s.apply_concurrency == 4
    s = OperatorSettings.from_env({"DISTSERVE_OPERATOR_PLANNER_PROCESSES": "0"}, plan_cache_size=0)
    assert (s.planner_processes, s.plan_cache_size) == (0, 0)


def test_cli_flags_become_settings() -> None:
    parser = argparse.ArgumentParser()
    cli_operator.add_arguments(parser)
    args, extra = parser.parse_known_args(["--metrics-port", "0", "--standalone", "-n", "ns"])
    assert extra == ["--standalone", "-n", "ns"]
    assert cli_operator.settings_from_args(args).metrics_port == 0


def test_paths() -> None:
    assert (
        kube.object_path("apps/v1", "StatefulSet", "ns", "a") == "/apis/apps/v1/namespaces/ns/statefulsets/a"
    )
    assert kube.collection_path("v1", "ConfigMap", "ns") == "/api/v1/namespaces/ns/configmaps"


def test_is_subset_ignores_server_defaults() -> None:
    desired = {"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "a"}]}}}}
    live = {
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "a", "terminationMessagePath": "/dev/x"}]}},
        }
    }
    assert kube.is_subset(desired, live)
    assert not kube.is_subset({"spec": {"replicas": 3}}, live)
    assert not kube.is_subset({"l": [1, 2]}, {"l": [1]})
    assert kube.is_subset({"q": 2}, {"q": "2"})


def test_metrics_names() -> None:
    m = OperatorMetrics()
    m.replanned("ml", "llm", "RateDrift")
    m.reconcile_seconds.observe(0.1)
    m.plan_seconds.observe(0.2)
    text = m.render().decode()
    assert 'distserve_operator_replans_total{deployment="llm",namespace="ml",reason="RateDrift"} 1.0' in text
    assert (
        "distserve_operator_reconcile_seconds_bucket" in text
        and "distserve_operator_plan_seconds_count" in text
    )
