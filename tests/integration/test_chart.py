"""The Helm chart, as `helm lint` / `helm template` (helm v4 from .tools) render it.

Runs the real helm binary that `make tools` installs; every rendered manifest is validated
against the Kubernetes 1.35 schemas with kubernetes-validate.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # for operator_support
HELM = ROOT / ".tools" / "helm"
CHART = ROOT / "charts" / "distserve"
K8S_VERSION = "1.35"

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm not installed: run `make tools`")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check)


def template(*sets: str, namespace: str = "ml-serving") -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--namespace", namespace, "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = kinds(docs, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_helm_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("watch.scope=ReleaseNamespace",),
        ("watch.scope=Namespaces", "watch.namespaces={team-a,team-b}", "podGroups.enabled=true"),
        ("metrics.serviceMonitor.enabled=true", "logLevel=Debug"),
        ("metrics.podMonitor.enabled=true", "grafana.dashboard.enabled=true"),
    ],
    ids=["default", "release-namespace", "namespaces+podgroups", "servicemonitor", "podmonitor+dashboard"],
)
def test_every_rendered_manifest_validates(sets: tuple[str, ...]) -> None:
    import kubernetes_validate

    docs = template(*sets)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            # A CRD kind outside the core schemas: check its shape by hand.
            endpoints = doc["spec"].get("endpoints") or doc["spec"]["podMetricsEndpoints"]
            assert all(e["path"] == "/metrics" for e in endpoints)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _rules(doc: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in doc["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table[(group, resource)] = set(rule["verbs"])
    return table


# Server-side apply (patch, and create when it creates), list to prune; no get.
CHILD_VERBS = {"list", "create", "patch", "delete"}
EXPECTED_RULES = {
    ("distserve.io", "distservedeployments"): {"get", "list", "watch", "patch"},
    ("distserve.io", "distservedeployments/status"): {"get", "patch"},
    ("", "configmaps"): CHILD_VERBS | {"get"},  # and the profile ConfigMap a deployment names
    ("", "services"): CHILD_VERBS,
    ("apps", "statefulsets"): CHILD_VERBS,
    ("apps", "deployments"): CHILD_VERBS,
    ("networking.k8s.io", "networkpolicies"): CHILD_VERBS,
    ("", "events"): {"create"},
    # Profiling Jobs (planner.profiling Auto): no patch (Jobs are immutable), no watch (the resync reads them).
    ("batch", "jobs"): {"get", "list", "create", "delete"},
    # Pods waiting for GPUs, and what other pods and quotas leave: read-only.
    ("", "pods"): {"get", "list"},
    ("", "resourcequotas"): {"get", "list"},
}
NODES = {("", "nodes"): {"get", "list"}}


def test_default_watches_all_namespaces_with_a_least_privilege_cluster_role() -> None:
    docs = template()
    (role,) = kinds(docs, "ClusterRole")
    (binding,) = kinds(docs, "ClusterRoleBinding")
    assert not kinds(docs, "Role") and not kinds(docs, "RoleBinding")
    # No podgroups, no secrets, no writes to pods, nothing watched but the CR.
    assert _rules(role) == {**EXPECTED_RULES, **NODES}
    assert {"name": "DISTSERVE_OPERATOR_GANG_SCHEDULING", "value": "false"} in container(docs)["env"]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rel-distserve", "namespace": "ml-serving"}
    ]
    assert "--all-namespaces" in container(docs)["args"]


def test_release_namespace_scope_uses_a_namespaced_role() -> None:
    docs = template("watch.scope=ReleaseNamespace")
    # Nodes are cluster-scoped: a read-only ClusterRole for them alone.
    (nodes,) = kinds(docs, "ClusterRole")
    assert _rules(nodes) == NODES and len(kinds(docs, "ClusterRoleBinding")) == 1
    assert not kinds(template("watch.scope=ReleaseNamespace", "capacity.readNodes=false"), "ClusterRole")
    (role,) = kinds(docs, "Role")
    assert role["metadata"]["namespace"] == "ml-serving"
    assert _rules(role) == EXPECTED_RULES
    args = container(docs)["args"]
    assert "--namespace=ml-serving" in args and "--all-namespaces" not in args


def test_listed_namespaces_get_one_role_each_and_podgroups_when_enabled() -> None:
    docs = template("watch.scope=Namespaces", "watch.namespaces={team-a,team-b}", "podGroups.enabled=true")
    roles = kinds(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in kinds(docs, "RoleBinding")) == ["team-a", "team-b"]
    rules = _rules(roles[0])
    assert rules[("scheduling.x-k8s.io", "podgroups")] == CHILD_VERBS
    assert rules[("", "pods")] == {"get", "list", "watch", "patch"}
    assert {"name": "DISTSERVE_OPERATOR_GANG_SCHEDULING", "value": "true"} in container(docs)["env"]
    args = container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_values_are_wired_into_the_deployment() -> None:
    docs = template(
        "image.repository=registry.example/distserve-operator",
        "image.tag=9.9.9",
        "metrics.port=9300",
        "resources.limits.memory=2Gi",
        "extraArgs={--peering=ops}",
        "nodeSelector.pool=system",
    )
    c = container(docs)
    assert c["image"] == "registry.example/distserve-operator:9.9.9"
    assert {"name": "metrics", "containerPort": 9300, "protocol": "TCP"} in c["ports"]
    assert {"name": "DISTSERVE_OPERATOR_METRICS_PORT", "value": "9300"} in c["env"]
    assert c["resources"]["limits"]["memory"] == "2Gi"
    assert c["args"][-1] == "--peering=ops"
    (svc,) = kinds(docs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 9300
    (deployment,) = kinds(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "system"}
    assert not kinds(docs, "ServiceMonitor")
    assert kinds(template("metrics.serviceMonitor.enabled=true"), "ServiceMonitor")


def test_default_image_tag_is_the_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(template())["image"] == f"ghcr.io/distserve/operator:{chart['appVersion']}"


def test_operator_pod_is_hardened() -> None:
    docs = template()
    (deployment,) = kinds(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = container(docs)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["limits"]["memory"]


def test_grafana_dashboard_configmap_holds_the_chart_dashboard_with_the_sidecar_label() -> None:
    assert not kinds(template(), "ConfigMap"), "no dashboard unless enabled"
    docs = template(
        "grafana.dashboard.enabled=true",
        "grafana.dashboard.namespace=monitoring",
        "grafana.dashboard.annotations.grafana_folder=DistServe",
    )
    (cm,) = kinds(docs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "DistServe"}
    (text,) = cm["data"].values()
    rendered = json.loads(text)
    assert rendered == json.loads((CHART / "dashboards" / "distserve.json").read_text())
    assert rendered["schemaVersion"] >= 39
    (default_ns,) = kinds(template("grafana.dashboard.enabled=true"), "ConfigMap")
    assert default_ns["metadata"]["namespace"] == "ml-serving"
    custom = template("grafana.dashboard.enabled=true", "grafana.dashboard.labels.team=ml")
    assert kinds(custom, "ConfigMap")[0]["metadata"]["labels"]["team"] == "ml"


def test_podmonitor_scrapes_every_watched_deployment_with_its_name_as_the_deployment_label() -> None:
    assert not kinds(template(), "PodMonitor")
    (pm,) = kinds(template("metrics.podMonitor.enabled=true", "metrics.podMonitor.interval=5s"), "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    # Worker and router pods, not the operator's own (operator/distserve_operator/labels.py).
    assert pm["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "distserve",
        "app.kubernetes.io/managed-by": "distserve-operator",
    }
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {
        "http",
        "metrics-prefill",
        "metrics-decode",
        "metrics-colocated",
    }
    for e in endpoints:
        assert e["interval"] == "5s"
        assert {
            "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
            "targetLabel": "deployment",
        } in e["relabelings"]
    (scoped,) = kinds(
        template("metrics.podMonitor.enabled=true", "watch.scope=Namespaces", "watch.namespaces={a,b}"),
        "PodMonitor",
    )
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}
    # The operator's per-deployment series keep their own namespace label.
    (sm,) = kinds(template("metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("imageTag=1.0", "imageTag"),
        ("watch.scope=Everywhere", "scope"),
        ("metrics.port=80", "port"),
        ("metrics.serviceMonitor.interval=soon", "interval"),
        ("metrics.podMonitor.interval=soon", "interval"),
        ("grafana.dashboard.enable=true", "enable"),
        ("grafana.dashboard.labels.grafana_dashboard=1", "grafana_dashboard"),
    ],
)
def test_schema_rejects_unknown_keys_and_bad_values(bad: str, needle: str) -> None:
    result = helm("template", "rel", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0
    assert needle in result.stderr


def test_namespaces_scope_needs_a_namespace() -> None:
    result = helm("template", "rel", str(CHART), "--set", "watch.scope=Namespaces", check=False)
    assert result.returncode != 0


def test_chart_crd_is_the_generated_one() -> None:
    (crd,) = [p for p in (CHART / "crds").iterdir()]
    assert crd.read_text() == (ROOT / "deploy" / "10-crd-distservedeployments.yaml").read_text()


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "scripts" / "render_manifests.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_manifests"] = module
    spec.loader.exec_module(module)
    return module


def test_plain_manifests_are_rendered_from_the_chart_and_valid() -> None:
    import kubernetes_validate

    assert _render_module().main(["check"]) == 0
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


async def test_the_default_role_allows_every_request_the_operator_makes() -> None:
    """Least privilege both ways: the rules above grant nothing more, and this run of the real
    operator (plan, re-plan and prune, delete) needs nothing the default ClusterRole lacks."""
    from operator_support.harness import eventually, operator_env
    from operator_support.manifests import dsd
    from operator_support.planners import plan_fn

    (role,) = kinds(template(), "ClusterRole")
    allowed = _rules(role)
    async with operator_env(plan_fn=plan_fn()) as env:
        await env.start_operator()
        # Profiling on: its Job is created, listed and read too.
        await env.create(dsd("llm", planner={"profiling": {"mode": "Auto"}}))
        await eventually(lambda: env.condition("llm", "Ready"), what="first reconcile")
        await eventually(lambda: env.api.items("batch/v1/jobs", "serving"), what="a profiling Job")
        await env.patch_spec("llm", {"slo": {"ttftMillis": 30, "tpotMillis": 5, "attainmentPercent": 90}})
        await eventually(lambda: env.status("llm").get("observedGeneration") == 2, what="a re-plan")
        await env.delete("llm")
        await eventually(lambda: env.cr("llm") is None, what="the CR to be gone")
        await env.stop_operator()
        made = env.api.rbac_requests()
    assert {("apps", "statefulsets", "patch"), ("apps", "statefulsets", "create")} <= made
    assert ("batch", "jobs", "create") in made
    missing = sorted((g, r, v) for g, r, v in made if v not in allowed.get((g, r), set()))
    assert not missing, f"the chart's ClusterRole does not allow {missing}"
