"""Rendering children from spec + plan (pure): GPU requests, probes, placement, layout, gang."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.manifests import dsd

from distserve_operator import children
from distserve_operator import labels as L
from distserve_operator.api import AutoscalingMode, Estimate, PhasePlan, PlanStatus, parse_spec


def _plan(
    affinity: str = "High",
    prefill: tuple[int, int, int] = (2, 1, 2),
    decode: tuple[int, int, int] = (1, 1, 3),
) -> PlanStatus:
    p = PhasePlan(tp=prefill[0], pp=prefill[1], replicas=prefill[2])
    d = PhasePlan(tp=decode[0], pp=decode[1], replicas=decode[2])
    return PlanStatus(
        prefill=p,
        decode=d,
        affinity=affinity,
        gpus=p.gpus + d.gpus,
        summary="s",
        estimated=Estimate(goodput_per_gpu=1.0),
    )


def _spec(**overrides: Any):  # type: ignore[no-untyped-def]
    return parse_spec(dsd("llm", **overrides)["spec"])


def _by_name(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def test_every_child_is_rendered_with_labels() -> None:
    objs = _by_name(children.render_all("llm", _spec(), _plan()))
    assert set(objs) == {
        "ConfigMap/llm-plan",
        "Service/llm-prefill",
        "Service/llm-decode",
        "NetworkPolicy/llm-workers",
        "StatefulSet/llm-prefill-s0",
        "StatefulSet/llm-decode-s0",
        "Deployment/llm-router",
        "Service/llm",
    }
    for obj in objs.values():
        labels = obj["metadata"]["labels"]
        assert labels[L.APP_INSTANCE] == "llm" and labels[L.APP_MANAGED_BY] == L.MANAGER_VALUE


def test_worker_pods_request_tp_gpus_and_are_locked_down() -> None:
    sts = _by_name(children.render_all("llm", _spec(), _plan()))["StatefulSet/llm-prefill-s0"]
    assert sts["spec"]["replicas"] == 2
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["limits"]["memory"] == "64Gi"
    assert c["command"][:3] == ["distserve", "worker", "prefill"]
    assert c["command"][c["command"].index("--http-port") + 1] == "9090"
    assert c["command"][c["command"].index("--advertise") + 1] == "$(POD_IP):50051"
    assert {"name": "DISTSERVE_STAGE", "value": "0"} in c["env"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9090}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
    assert (
        c["securityContext"]["readOnlyRootFilesystem"]
        and not c["securityContext"]["allowPrivilegeEscalation"]
    )
    assert pod["securityContext"]["runAsNonRoot"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/etc/distserve", "/tmp"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_cpu_clusters_request_no_gpu() -> None:
    sts = _by_name(children.render_all("llm", _spec(cluster={"gpu": {"type": "CPU"}}), _plan()))
    c = sts["StatefulSet/llm-prefill-s0"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_one_statefulset_per_pipeline_stage() -> None:
    objs = _by_name(children.render_all("llm", _spec(), _plan(prefill=(1, 3, 2))))
    assert {"StatefulSet/llm-prefill-s0", "StatefulSet/llm-prefill-s1", "StatefulSet/llm-prefill-s2"} <= set(
        objs
    )
    assert objs["StatefulSet/llm-prefill-s2"]["spec"]["template"]["metadata"]["labels"][L.STAGE] == "2"


def test_high_affinity_spreads_instances() -> None:
    pod = _by_name(children.render_all("llm", _spec(), _plan()))["StatefulSet/llm-decode-s0"]["spec"][
        "template"
    ]["spec"]
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_low_affinity_separate_pods_puts_decode_stage_on_prefill_stage_node() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SeparatePods"})
    objs = _by_name(children.render_all("llm", spec, _plan("Low", (1, 2, 2), (1, 2, 2))))
    pod = objs["StatefulSet/llm-decode-s1"]["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == {L.APP_INSTANCE: "llm", L.ROLE: "prefill", L.STAGE: "1"}


def test_low_affinity_shared_pod_runs_both_segments_in_one_pod() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SharedPod"})
    objs = _by_name(children.render_all("llm", spec, _plan("Low", (2, 2, 2), (1, 2, 2))))
    assert "StatefulSet/llm-prefill-s0" not in objs
    pod = objs["StatefulSet/llm-pd-s1"]["spec"]["template"]["spec"]
    prefill, decode = pod["containers"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert (
        prefill["resources"]["limits"]["nvidia.com/gpu"] == "2"
        and decode["resources"]["limits"]["nvidia.com/gpu"] == "1"
    )
    assert (
        prefill["ports"][0]["containerPort"] != decode["ports"][0]["containerPort"]
    )  # one network namespace
    # Both headless Services find the shared pods, each on its own named port.
    labels = objs["StatefulSet/llm-pd-s1"]["spec"]["template"]["metadata"]["labels"]
    for role in ("prefill", "decode"):
        svc = objs[f"Service/llm-{role}"]["spec"]
        assert all(labels.get(k) == v for k, v in svc["selector"].items())
        assert svc["ports"][0]["targetPort"] == f"grpc-{role}"


def test_shared_pod_falls_back_to_separate_pods_when_shapes_differ() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SharedPod"})
    objs = _by_name(children.render_all("llm", spec, _plan("Low", (2, 2, 1), (1, 1, 3))))
    assert "StatefulSet/llm-prefill-s1" in objs and "StatefulSet/llm-decode-s0" in objs


def test_gang_scheduling_renders_a_podgroup_per_instance_and_gates_pods() -> None:
    spec = _spec(placement={"affinity": "High", "gangScheduling": "PodGroup"})
    objs = _by_name(children.render_all("llm", spec, _plan(prefill=(1, 2, 2))))
    groups = {k: v for k, v in objs.items() if k.startswith("PodGroup/")}
    assert set(groups) == {
        "PodGroup/llm-prefill-i0",
        "PodGroup/llm-prefill-i1",
        "PodGroup/llm-decode-i0",
        "PodGroup/llm-decode-i1",
        "PodGroup/llm-decode-i2",
    }
    assert groups["PodGroup/llm-prefill-i1"]["spec"]["minMember"] == 2
    pod = objs["StatefulSet/llm-prefill-s1"]["spec"]["template"]["spec"]
    assert pod["schedulingGates"] == [{"name": children.GANG_GATE}]
    live_pod = {
        "metadata": {
            "name": "llm-prefill-s1-1",
            "labels": objs["StatefulSet/llm-prefill-s1"]["spec"]["template"]["metadata"]["labels"],
        },
        "spec": {"schedulingGates": [{"name": children.GANG_GATE}, {"name": "other"}]},
    }
    patch = children.ungate_patch(live_pod)
    assert patch == {
        "metadata": {"labels": {L.POD_GROUP: "llm-prefill-i1"}},
        "spec": {"schedulingGates": [{"name": "other"}]},
    }
    assert children.ungate_patch({"metadata": {"name": "x-0"}, "spec": {}}) is None


def test_network_policy_admits_only_own_pods_to_grpc() -> None:
    np = _by_name(children.render_all("llm", _spec(), _plan()))["NetworkPolicy/llm-workers"]["spec"]
    grpc_rule, metrics_rule = np["ingress"]
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": {L.APP_INSTANCE: "llm", L.APP_NAME: "distserve"}}}
    ]
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": 50051}]
    assert "from" not in metrics_rule


def test_plan_configmap_is_the_runtime_contract() -> None:
    spec, plan = _spec(), _plan()
    cm = children.render_plan_configmap("llm", spec, plan)
    doc = json.loads(cm["data"]["plan.json"])
    assert doc["model"]["name"] == spec.model.name
    assert doc["slo"]["ttftMillis"] == 200
    assert doc["plan"]["prefill"] == {"tp": 2, "pp": 1, "replicas": 2}


def test_router_and_user_service() -> None:
    objs = _by_name(children.render_all("llm", _spec(), _plan()))
    c = objs["Deployment/llm-router"]["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:3] == ["distserve", "worker", "router"]
    assert c["command"][c["command"].index("--prefill-dns") + 1] == "llm-prefill.$(POD_NAMESPACE).svc"
    assert c["command"][c["command"].index("--decode-port") + 1] == "50051"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert objs["Service/llm"]["spec"]["ports"][0]["port"] == 8000


def test_replica_changes_do_not_restart_pods_but_shape_changes_do() -> None:
    a, b, c = _plan(prefill=(2, 1, 2)), _plan(prefill=(2, 1, 5)), _plan(prefill=(4, 1, 2))
    assert children.parallelism_hash(a) == children.parallelism_hash(b) != children.parallelism_hash(c)


def test_external_mode_leaves_statefulset_replicas_alone() -> None:
    sts = {"kind": "StatefulSet"}
    assert not children.scaled_by_operator(sts, AutoscalingMode.EXTERNAL)
    assert children.scaled_by_operator(sts, AutoscalingMode.PLANNER)
    assert children.scaled_by_operator({"kind": "Deployment"}, AutoscalingMode.EXTERNAL)


@pytest.mark.parametrize(
    "placement",
    [
        {"affinity": "High"},
        {"affinity": "Low", "stageLayout": "SeparatePods"},
        {"affinity": "Low", "stageLayout": "SharedPod", "gangScheduling": "PodGroup"},
    ],
)
def test_rendered_children_pass_the_kubernetes_schema(placement: dict[str, str]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    affinity = placement["affinity"]
    spec = _spec(placement=placement)
    for obj in children.render_all("llm", spec, _plan(affinity, (2, 2, 2), (1, 2, 2))):
        if obj["kind"] == "PodGroup":
            continue  # a scheduler-plugins CRD: not in the Kubernetes schema
        obj["metadata"]["namespace"] = "serving"
        kubernetes_validate.validate(obj, "1.35", strict=True)
