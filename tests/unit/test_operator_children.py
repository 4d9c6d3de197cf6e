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
from distserve_operator.api import (
    AutoscalingMode,
    EngineLimits,
    Estimate,
    PhasePlan,
    PlanStatus,
    RuntimeContract,
    parse_spec,
)
from distserve_operator.api.spec import MAX_TP


def _plan(
    affinity: str = "High",
    prefill: tuple[int, int, int] = (2, 1, 2),
    decode: tuple[int, int, int] = (1, 1, 3),
    node_span: int = 1,
) -> PlanStatus:
    p = PhasePlan(tp=prefill[0], pp=prefill[1], replicas=prefill[2])
    d = PhasePlan(tp=decode[0], pp=decode[1], replicas=decode[2])
    return PlanStatus(
        prefill=p,
        decode=d,
        affinity=affinity,
        node_span=node_span,
        gpus=p.gpus + d.gpus,
        summary="s",
        estimated=Estimate(goodput_per_gpu=1.0),
    )


# The hand-written plans below use TP2 and TP4: a model whose 32 heads and 8 KV heads split so
# (the runtime contract refuses a TP that does not divide them, as the workers would).
NS = "serving"
LLAMA = {"name": "meta-llama/Meta-Llama-3-8B-Instruct", "dtype": "bfloat16"}


def _spec(**overrides: Any):  # type: ignore[no-untyped-def]
    return parse_spec(dsd("llm", **{"model": LLAMA, **overrides})["spec"])


def _by_name(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Kind/name, with the plan's revision left out of worker object names (tests below name
    `llm-prefill-s0` for `llm-prefill-<revision>-s0`); the workers' plan copy is `llm-plan@workers`."""
    out = {}
    for o in objs:
        name = o["metadata"]["name"]
        rev = (o["metadata"].get("labels") or {}).get(L.REVISION)
        if rev:
            name = name.replace(f"-{rev}", "@workers" if o["kind"] == "ConfigMap" else "")
        out[f"{o['kind']}/{name}"] = o
    return out


def test_worker_objects_carry_the_plans_revision_in_name_and_label() -> None:
    """A re-plan that changes the pods' shape gets new names (new groups beside the old ones); one
    that changes only replica counts keeps them (scaled in place)."""
    plan = _plan()
    rev = children.revision(plan)
    objs = children.render_all("llm", _spec(), plan, namespace=NS)
    sets = [o for o in objs if o["kind"] == "StatefulSet"]
    assert {o["metadata"]["name"] for o in sets} == {f"llm-prefill-{rev}-s0", f"llm-decode-{rev}-s0"}
    for o in sets:
        assert o["metadata"]["labels"][L.REVISION] == rev
        assert o["spec"]["selector"]["matchLabels"][L.REVISION] == rev
        pod = o["spec"]["template"]["spec"]
        # The workers mount their revision's plan copy: a restart mid-rollout keeps its shape.
        assert pod["volumes"][0]["configMap"]["name"] == f"llm-plan-{rev}"
    more = _plan(prefill=(2, 1, 5), decode=(1, 1, 7))
    assert children.revision(more) == rev
    for reshaped in (_plan(prefill=(4, 1, 1)), _plan(decode=(1, 2, 3)), _plan(affinity="Low")):
        assert children.revision(reshaped) != rev
    split = _plan(decode=(1, 2, 3))
    other = split.model_copy(update={"decode": split.decode.model_copy(update={"stage_layers": [10, 22]})})
    assert children.revision(other) != children.revision(split)


def test_every_child_is_rendered_with_labels() -> None:
    objs = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))
    assert set(objs) == {
        "ConfigMap/llm-plan",
        "ConfigMap/llm-plan@workers",
        "Service/llm-prefill",
        "Service/llm-decode",
        "Service/llm-prefill-s0",
        "Service/llm-decode-s0",
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
    sts = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))["StatefulSet/llm-prefill-s0"]
    assert sts["spec"]["replicas"] == 2
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["limits"]["memory"] == "64Gi"
    assert c["command"][:3] == ["distserve", "worker", "prefill"]
    assert c["command"][c["command"].index("--http-port") + 1] == "9090"
    assert c["command"][c["command"].index("--advertise") + 1] == "$(POD_IP):50051"
    assert c["command"][c["command"].index("--stage") + 1] == "0"
    # TP2: the follower rank serves gRPC in the same pod, on the contract's rankPortBase + 1.
    assert {"name": "prefill-rank1", "containerPort": 51052, "protocol": "TCP"} in c["ports"]
    assert not any(e["name"] in ("DISTSERVE_STAGE", "DISTSERVE_DEPLOYMENT") for e in c["env"])
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
    sts = _by_name(children.render_all("llm", _spec(cluster={"gpu": {"type": "CPU"}}), _plan(), namespace=NS))
    c = sts["StatefulSet/llm-prefill-s0"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})


def test_one_statefulset_per_pipeline_stage() -> None:
    objs = _by_name(children.render_all("llm", _spec(), _plan(prefill=(1, 3, 2)), namespace=NS))
    assert {"StatefulSet/llm-prefill-s0", "StatefulSet/llm-prefill-s1", "StatefulSet/llm-prefill-s2"} <= set(
        objs
    )
    assert objs["StatefulSet/llm-prefill-s2"]["spec"]["template"]["metadata"]["labels"][L.STAGE] == "2"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(objs: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """StatefulSet name -> its pods' labels."""
    return {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objs.values()
        if o["kind"] == "StatefulSet"
    }


@pytest.mark.parametrize(
    ("placement", "affinity"),
    [
        ({"affinity": "High"}, "High"),
        ({"affinity": "Low", "stageLayout": "SeparatePods"}, "Low"),
        ({"affinity": "Low", "stageLayout": "SharedPod"}, "Low"),
    ],
)
def test_each_stage_statefulset_has_its_own_headless_service(
    placement: dict[str, str], affinity: str
) -> None:
    objs = _by_name(
        children.render_all(
            "llm", _spec(placement=placement), _plan(affinity, (1, 2, 2), (1, 2, 2)), namespace=NS
        )
    )
    pods = _pod_labels(objs)
    assert len(pods) == (2 if placement.get("stageLayout") == "SharedPod" else 4)
    live = {o["metadata"]["name"]: o for o in objs.values()}
    for sts_name, labels in pods.items():
        sts = live[sts_name]
        svc = next(o for o in objs.values() if o["kind"] == "Service" and o["metadata"]["name"] == sts_name)
        # It governs the StatefulSet: pod k is `<sts>-<k>.<sts>.<namespace>.svc`.
        assert sts["spec"]["serviceName"] == sts_name
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        # It selects exactly this StatefulSet's pods.
        assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
        assert _selects(svc["spec"]["selector"], labels)
        assert [name for name, other in pods.items() if _selects(svc["spec"]["selector"], other)] == [
            sts_name
        ]
        # Its ports are the containers' named gRPC and metrics ports.
        named = {
            p["name"]: p["containerPort"]
            for c in sts["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        roles = [c["name"] for c in sts["spec"]["template"]["spec"]["containers"]]
        assert {p["targetPort"] for p in svc["spec"]["ports"]} == {
            f"{kind}-{role}" for role in roles for kind in ("grpc", "metrics")
        }
        assert all(named[p["targetPort"]] == p["port"] for p in svc["spec"]["ports"])


@pytest.mark.parametrize(
    ("placement", "affinity"),
    [({"affinity": "High"}, "High"), ({"affinity": "Low", "stageLayout": "SharedPod"}, "Low")],
)
def test_role_services_select_only_stage_zero(placement: dict[str, str], affinity: str) -> None:
    """The router calls stage 0 of an instance only: stages >= 1 are not behind the role Services."""
    objs = _by_name(
        children.render_all(
            "llm", _spec(placement=placement), _plan(affinity, (1, 2, 2), (1, 2, 2)), namespace=NS
        )
    )
    pods = _pod_labels(objs)
    for role in ("prefill", "decode"):
        svc = objs[f"Service/llm-{role}"]["spec"]
        assert svc["selector"][L.STAGE] == "0" and svc["clusterIP"] == "None"
        selected = {name for name, labels in pods.items() if _selects(svc["selector"], labels)}
        assert selected and all(pods[name][L.STAGE] == "0" for name in selected)
        # ... and every stage-0 pod serving the role.
        serves = L.SERVES_PREFILL if role == "prefill" else L.SERVES_DECODE
        assert selected == {n for n, labels in pods.items() if labels[L.STAGE] == "0" and serves in labels}
        assert svc["ports"][0]["targetPort"] == f"grpc-{role}"


def test_high_affinity_spreads_instances() -> None:
    pod = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))["StatefulSet/llm-decode-s0"][
        "spec"
    ]["template"]["spec"]
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_low_affinity_separate_pods_puts_decode_stage_on_prefill_stage_node() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SeparatePods"})
    plan = _plan("Low", (1, 2, 2), (1, 2, 2), node_span=2)
    objs = _by_name(children.render_all("llm", spec, plan, namespace=NS))
    pod = objs["StatefulSet/llm-decode-s1"]["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    # The prefill stage of its own revision: the old one goes away after a staged re-plan.
    assert term["labelSelector"]["matchLabels"] == {
        L.APP_INSTANCE: "llm",
        L.ROLE: "prefill",
        L.STAGE: "1",
        L.REVISION: children.revision(plan),
    }
    assert "affinity" not in objs["StatefulSet/llm-prefill-s1"]["spec"]["template"]["spec"]


def test_low_affinity_with_different_depths_keeps_each_node_segment_together() -> None:
    """Prefill PP4 and decode PP2 over 2 nodes: node 0 holds prefill stages 0-1 and decode stage 0,
    node 1 prefill stages 2-3 and decode stage 1."""
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SeparatePods"})
    plan = _plan("Low", (1, 4, 1), (2, 2, 1), node_span=2)
    objs = _by_name(children.render_all("llm", spec, plan, namespace=NS))

    def anchor(sts: str) -> str | None:
        pod = objs[f"StatefulSet/{sts}"]["spec"]["template"]["spec"]
        if "affinity" not in pod:
            return None
        (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        labels = term["labelSelector"]["matchLabels"]
        return f"{labels[L.ROLE]}-s{labels[L.STAGE]}"

    assert [anchor(f"llm-prefill-s{i}") for i in range(4)] == [None, "prefill-s0", None, "prefill-s2"]
    assert [anchor(f"llm-decode-s{i}") for i in range(2)] == ["prefill-s0", "prefill-s2"]


def test_low_affinity_shared_pod_runs_both_segments_in_one_pod() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SharedPod"})
    objs = _by_name(children.render_all("llm", spec, _plan("Low", (2, 2, 2), (1, 2, 2)), namespace=NS))
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
    # Both role Services find the shared stage-0 pods, each on its own named port.
    labels = objs["StatefulSet/llm-pd-s0"]["spec"]["template"]["metadata"]["labels"]
    for role in ("prefill", "decode"):
        svc = objs[f"Service/llm-{role}"]["spec"]
        assert all(labels.get(k) == v for k, v in svc["selector"].items())
        assert svc["ports"][0]["targetPort"] == f"grpc-{role}"


def test_shared_pod_falls_back_to_separate_pods_when_shapes_differ() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SharedPod"})
    objs = _by_name(children.render_all("llm", spec, _plan("Low", (2, 2, 1), (1, 1, 3)), namespace=NS))
    assert "StatefulSet/llm-prefill-s1" in objs and "StatefulSet/llm-decode-s0" in objs


def test_gang_scheduling_renders_a_podgroup_per_instance_and_gates_pods() -> None:
    spec = _spec(placement={"affinity": "High", "gangScheduling": "PodGroup"})
    objs = _by_name(children.render_all("llm", spec, _plan(prefill=(1, 2, 2)), namespace=NS))
    rev = children.revision(_plan(prefill=(1, 2, 2)))
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
            "name": f"llm-prefill-{rev}-s1-1",
            "labels": objs["StatefulSet/llm-prefill-s1"]["spec"]["template"]["metadata"]["labels"],
        },
        "spec": {"schedulingGates": [{"name": children.GANG_GATE}, {"name": "other"}]},
    }
    patch = children.ungate_patch(live_pod)
    assert patch == {
        "metadata": {"labels": {L.POD_GROUP: f"llm-prefill-{rev}-i1"}},
        "spec": {"schedulingGates": [{"name": "other"}]},
    }
    assert children.ungate_patch({"metadata": {"name": "x-0"}, "spec": {}}) is None


def test_network_policy_admits_only_own_pods_to_grpc() -> None:
    np = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))["NetworkPolicy/llm-workers"][
        "spec"
    ]
    grpc_rule, metrics_rule = np["ingress"]
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": {L.APP_INSTANCE: "llm", L.APP_NAME: "distserve"}}}
    ]
    # Rank 0 of both roles, and every follower rank port of each role, whatever this plan's tp:
    # during a staged re-plan the old revision's ranks (another tp) still serve KV pulls.
    assert grpc_rule["ports"] == [
        {"protocol": "TCP", "port": 50051},
        {"protocol": "TCP", "port": 51052, "endPort": 51051 + MAX_TP - 1},  # prefill ranks
        {"protocol": "TCP", "port": 51051 + MAX_TP + 1, "endPort": 51051 + 2 * MAX_TP - 1},  # decode ranks
    ]
    assert "from" not in metrics_rule


def _contract(spec: Any, plan: PlanStatus) -> RuntimeContract:
    cm = children.render_plan_configmap("llm", spec, plan, namespace=NS)
    return RuntimeContract.model_validate(json.loads(cm["data"]["plan.json"]))


def test_plan_configmap_is_the_runtime_contract() -> None:
    limits = EngineLimits(prefill_token_budget=1024, decode_max_batch=96, decode_kv_tokens=123_456)
    plan = _plan(prefill=(2, 3, 2), decode=(4, 1, 3)).model_copy(update={"limits": limits})
    spec = _spec()
    contract = _contract(spec, plan)
    assert contract.model.name == spec.model.name and contract.slo.ttft_millis == 200
    assert contract.shape is not None and (contract.shape.layers, contract.shape.heads) == (32, 32)
    # Stages cover the model's 32 layers, contiguously, in the plan's pp.
    prefill = contract.prefill
    assert (prefill.tp, prefill.pp, prefill.replicas) == (2, 3, 2)
    assert [(s.layers.start, s.layers.end) for s in prefill.stages] == [(0, 11), (11, 22), (22, 32)]
    # Each stage's own headless Service, and where its pod of instance k listens.
    rev = children.revision(plan)
    assert [s.service for s in contract.decode.stages] == [f"llm-decode-{rev}-s0.serving.svc"]
    assert [s.address for s in prefill.stages] == [
        f"llm-prefill-{rev}-s{i}-{{ordinal}}.llm-prefill-{rev}-s{i}.serving.svc:50051" for i in range(3)
    ]
    assert (contract.decode.tp, contract.decode.stages[0].layers.end) == (4, 32)
    # Exactly the limits the planner simulated.
    assert contract.limits == limits
    assert (prefill.grpc_port, prefill.metrics_port, prefill.rank_port_base) == (50051, 9090, 51051)
    assert contract.decode.rank_port_base == 51067
    assert contract.plan is not None and contract.plan.summary == plan.summary


def test_shared_pod_contract_gives_decode_the_next_ports() -> None:
    spec = _spec(placement={"affinity": "Low", "stageLayout": "SharedPod"})
    contract = _contract(spec, _plan("Low", (2, 2, 2), (2, 2, 2)))
    pd = f"llm-pd-{children.revision(_plan('Low', (2, 2, 2), (2, 2, 2)))}"
    decode = contract.decode
    assert (decode.grpc_port, decode.metrics_port) == (50052, 9091)
    # Both roles' stage i live in the pods of `llm-pd-s<i>`, each role on its own port.
    for phase, port in ((contract.prefill, 50051), (decode, 50052)):
        assert [s.service for s in phase.stages] == [f"{pd}-s0.serving.svc", f"{pd}-s1.serving.svc"]
        assert [s.address for s in phase.stages] == [
            f"{pd}-s{i}-{{ordinal}}.{pd}-s{i}.serving.svc:{port}" for i in range(2)
        ]
    pod = _by_name(children.render_all("llm", spec, _plan("Low", (2, 2, 2), (2, 2, 2)), namespace=NS))[
        "StatefulSet/llm-pd-s1"
    ]
    ports = {p["containerPort"] for c in pod["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {50051, 50052, 9090, 9091, 51052, decode.rank_port_base + 1} <= ports and len(ports) == 6


def test_a_plan_without_limits_gets_the_planners() -> None:
    """A plan recorded before plans carried limits: the same figures the planner would simulate."""
    contract = _contract(_spec(), _plan())
    assert contract.limits.decode_max_batch == 256  # a GPU's default
    assert contract.limits.prefill_token_budget == 2048
    assert contract.limits.decode_kv_tokens > 100_000  # Llama-3-8B TP1 on an 80 GB A100
    cpu = _contract(_spec(cluster={"gpu": {"type": "CPU"}}, engine={"prefillTokenBudget": 512}), _plan())
    assert (cpu.limits.decode_max_batch, cpu.limits.prefill_token_budget) == (32, 512)


def test_pvc_models_mount_under_the_root_the_worker_reads() -> None:
    spec = _spec(model={**LLAMA, "source": {"kind": "PVC", "claimName": "weights", "path": "llama"}})
    c = _by_name(children.render_all("llm", spec, _plan(), namespace=NS))["StatefulSet/llm-decode-s0"][
        "spec"
    ]["template"]["spec"]["containers"][0]
    assert {"name": "DISTSERVE_MODEL_ROOT", "value": "/models"} in c["env"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]


def test_router_and_user_service() -> None:
    objs = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))
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
    for obj in children.render_all("llm", spec, _plan(affinity, (2, 2, 2), (1, 2, 2)), namespace=NS):
        if obj["kind"] == "PodGroup":
            continue  # a scheduler-plugins CRD: not in the Kubernetes schema
        obj["metadata"]["namespace"] = "serving"
        kubernetes_validate.validate(obj, "1.35", strict=True)


def _colocated_plan(replicas: int = 3) -> PlanStatus:
    from distserve_operator.api import ColocatedPlan, PlanMode

    limits = EngineLimits(prefill_token_budget=2048, decode_max_batch=64, decode_kv_tokens=50_000)
    return _plan().model_copy(
        update={
            "mode": PlanMode.COLOCATED,
            "colocated": ColocatedPlan(tp=1, pp=1, replicas=replicas, goodput_per_gpu=2.0, limits=limits),
            "limits": limits,
            "gpus": replicas,
        }
    )


def test_colocated_mode_renders_colocated_statefulsets_the_router_finds_as_both_roles() -> None:
    spec, plan = _spec(), _colocated_plan()
    objs = children.render_all("llm", spec, plan, namespace=NS)
    workers = [o for o in objs if o["kind"] == "StatefulSet"]
    # One StatefulSet of colocated pods; no prefill or decode ones.
    assert [o["metadata"]["labels"][L.ROLE] for o in workers] == [L.ROLE_COLOCATED]
    (sts,) = workers
    assert sts["spec"]["replicas"] == 3
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels[L.SERVES_PREFILL] == labels[L.SERVES_DECODE] == "true" and labels[L.STAGE] == "0"
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["distserve", "worker", "colocated"]
    gpu = spec.cluster.gpu.resource_name
    assert container["resources"]["limits"][gpu] == "1"
    # The router's role Services select those pods (by both labels) and reach their one port.
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    port_names = {p["name"] for p in container["ports"]}
    for role, serves in (("prefill", L.SERVES_PREFILL), ("decode", L.SERVES_DECODE)):
        svc = services[f"llm-{role}"]["spec"]
        assert svc["selector"][serves] == "true" and all(
            labels.get(k) == v for k, v in svc["selector"].items()
        )
        assert {p["targetPort"] for p in svc["ports"]} <= port_names
    assert set(children.role_replicas("llm", spec, plan)) == {"colocated-s0", "router"}
    # The plan the pods read: mode Colocated, the colocated entry, prefill and decode the same instances.
    document = json.loads(next(o for o in objs if o["kind"] == "ConfigMap")["data"][children.PLAN_KEY])
    contract = RuntimeContract.model_validate(document)
    assert contract.mode.value == "Colocated" and contract.colocated is not None
    assert (contract.colocated.tp, contract.colocated.pp, contract.colocated.replicas) == (1, 1, 3)
    assert contract.prefill.stages[0].address == contract.colocated.stages[0].address
    assert contract.limits.decode_kv_tokens == 50_000


def test_colocated_plan_changes_the_shape_hash_and_a_disaggregated_one_keeps_it() -> None:
    plan = _plan()
    assert children.parallelism_hash(_colocated_plan()) != children.parallelism_hash(plan)
    assert children.parallelism_hash(plan.model_copy(update={"colocated": _colocated_plan().colocated})) == (
        children.parallelism_hash(plan)
    )


def test_router_overload_settings_reach_the_router_command() -> None:
    """`spec.router.maxQueue` / `queueTimeoutSeconds` become the router's flags; defaults when unset."""

    def flags(spec: Any) -> tuple[str, str]:
        objs = _by_name(children.render_all("llm", spec, _plan(), namespace=NS))
        cmd = objs["Deployment/llm-router"]["spec"]["template"]["spec"]["containers"][0]["command"]
        return cmd[cmd.index("--max-queue") + 1], cmd[cmd.index("--queue-timeout-seconds") + 1]

    assert flags(_spec()) == ("128", "30")
    assert flags(_spec(router={"maxQueue": 0, "queueTimeoutSeconds": 5})) == ("0", "5")


def test_router_api_keys_are_a_mounted_secret_the_router_reads_as_a_file() -> None:
    """spec.router.auth.apiKeySecretRef: the Secret's key is mounted (a directory, so the kubelet's
    updates reach it) and the router gets --api-key-file; the operator never reads the Secret."""
    ref = {"name": "llm-keys", "key": "api-keys"}
    objs = _by_name(
        children.render_all("llm", _spec(router={"auth": {"apiKeySecretRef": ref}}), _plan(), namespace=NS)
    )
    pod = objs["Deployment/llm-router"]["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--api-key-file") + 1] == children.API_KEYS_FILE
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": children.API_KEYS_DIR, "readOnly": True}
    assert "subPath" not in mount
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "llm-keys"
    assert volume["secret"]["items"] == [{"key": "api-keys", "path": "keys"}]

    plain = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))["Deployment/llm-router"]
    plain_pod = plain["spec"]["template"]["spec"]
    assert "--api-key-file" not in plain_pod["containers"][0]["command"]
    assert [v["name"] for v in plain_pod["volumes"]] == ["plan", "tmp"]


def test_worker_pods_drain_within_their_grace_period() -> None:
    """spec.worker.terminationGracePeriodSeconds is the pod's; the worker drains for less, so it
    exits by itself (finishing what it holds) before the kubelet's SIGKILL."""
    spec = _spec(worker={"terminationGracePeriodSeconds": 300})
    sts = _by_name(children.render_all("llm", spec, _plan(), namespace=NS))["StatefulSet/llm-decode-s0"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    command = pod["containers"][0]["command"]
    drain = int(command[command.index("--drain-seconds") + 1])
    assert drain == 300 - children.DRAIN_MARGIN_SECONDS and 0 < drain < 300
    default = _by_name(children.render_all("llm", _spec(), _plan(), namespace=NS))[
        "StatefulSet/llm-decode-s0"
    ]
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
