"""Operator settings, the kube helpers that need no server, metrics and the CLI entry (pure)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def test_the_client_logs_in_with_the_kubeconfig_outside_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": "https://k8s.example:6443", "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path = tmp_path / "config"
    path.write_text(json.dumps(kubeconfig))
    # KUBECONFIG as the kubernetes library read it at import.
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    configuration = kube.load_configuration(None)
    assert configuration.host == "https://k8s.example:6443"
    assert configuration.auth_settings()["BearerToken"]["value"] == "Bearer s3cret"
    # --api-server (an emulator) wins over both, with no credentials.
    emulator = kube.load_configuration("http://127.0.0.1:1234/")
    assert (emulator.host, emulator.api_key) == ("http://127.0.0.1:1234", {})


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
