"""Render the Kubernetes objects of one DistServeDeployment from its spec and plan (pure).

Topology (DESIGN.md, "Children"):

- `ConfigMap <name>-plan`, key `plan.json`: the runtime contract (`api.RuntimeContract`) read by
  the router: model and shape, each role's tp/pp/stages/ports, the engine limits. The workers of
  a revision mount their own copy, `<name>-plan-<revision>`, so a pod of an old revision that
  restarts during a rollout still reads the shape it runs.
- Per role and pipeline stage a StatefulSet `<name>-<role>-<revision>-s<i>`; ordinal k of every
  stage of a role is instance k. Each pod requests `<gpu resource>: <tp>`. The revision is the hash
  of the pods' shape (tp, pp, stage split, placement): a re-plan that changes it brings up new
  groups beside the old ones and drains the old ones once the new serve (rollout.py); one that
  changes only replica counts scales the groups in place.
- Low node affinity, layout SeparatePods: node j of a pipeline holds segment j of both phases (their
  depths may differ): every stage of it requires the node of the segment's first prefill stage.
  Layout SharedPod: one StatefulSet `<name>-pd-<revision>-s<i>` whose pods run both stage segments, so the
  KV cache moves over NVLink / CUDA IPC inside the pod.
- A headless Service per stage StatefulSet, named like it and governing it (`serviceName`), so
  every stage pod has a stable DNS name `<sts>-<k>.<sts>.<namespace>.svc`; it publishes pods before
  they are ready, since the stages of an instance find each other while they start. The plan's
  `stages[i].address` is that name with `{ordinal}` for k: stage 0 of instance k reaches its
  stages 1..pp-1 there.
- A headless Service per role (`<name>-prefill`, `<name>-decode`) selecting only stage-0 pods: the
  instances the router resolves and calls. The router Deployment and the Service users call
  (`<name>`).
- A NetworkPolicy letting only this deployment's pods reach the workers' gRPC ports (rank 0's and
  the tensor-parallel follower ranks', which decode ranks pull KV from).
- Gang scheduling: one scheduler-plugins PodGroup per instance (its pp stage pods).

Everything the worker runtime reads (command line, ports, mounts, probe) is in this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from . import labels as L
from .api import (
    AutoscalingMode,
    DistServeDeploymentSpec,
    GangScheduling,
    GpuType,
    PhasePlan,
    PlacementAffinity,
    PlanMode,
    PlanStatus,
    SourceKind,
    StageLayout,
    rank_port_base,
)
from .api.spec import MAX_TP
from .contract import runtime_contract

PLAN_DIR = "/etc/distserve"
PLAN_FILE = f"{PLAN_DIR}/plan.json"
# spec.router.auth: the API keys Secret's key, mounted as a file the router re-reads when the kubelet
# updates it (hence a directory mount: a subPath mount is never updated).
API_KEYS_DIR = "/etc/distserve-api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"
PLAN_KEY = "plan.json"
MODEL_DIR = "/models"
RUN_AS_USER = 10001
POD_GROUP_API = "scheduling.x-k8s.io/v1alpha1"
# A draining worker exits this long before its grace period ends: time to close connections and
# flush metrics before the kubelet's SIGKILL.
DRAIN_MARGIN_SECONDS = 10
ROUTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}

Obj = dict[str, Any]


@dataclass(frozen=True)
class WorkerGroup:
    """One StatefulSet: the pods of one pipeline stage of one role (or of both, SharedPod)."""

    role: str  # labels.ROLE_PREFILL / ROLE_DECODE / ROLE_PAIRED
    stage: int
    replicas: int
    segments: tuple[tuple[str, PhasePlan], ...]  # (role, phase plan) per container
    revision: str = ""  # the plan's shape (revision()); worker_groups fills it in

    def name(self, instance: str) -> str:
        short = "pd" if self.role == L.ROLE_PAIRED else self.role
        return f"{instance}-{short}-{self.revision}-s{self.stage}"

    @property
    def status_name(self) -> str:
        return f"{self.role}-s{self.stage}"


def plan_configmap_name(name: str, revision: str = "") -> str:
    """The router's plan (`<name>-plan`), or the copy the workers of one revision mount."""
    return f"{name}-plan-{revision}" if revision else f"{name}-plan"


def role_service_name(name: str, role: str) -> str:
    return f"{name}-{role}"


def router_name(name: str) -> str:
    return f"{name}-router"


def stage_service_name(name: str, group: WorkerGroup) -> str:
    """The headless Service governing one stage StatefulSet: its own name."""
    return group.name(name)


def stage_groups(spec: DistServeDeploymentSpec, plan: PlanStatus) -> dict[str, list[WorkerGroup]]:
    """role (prefill, decode) -> the StatefulSet of each of its stages, stage 0 first (in SharedPod
    both roles' stage i is the same `<name>-pd-s<i>`)."""
    out: dict[str, list[WorkerGroup]] = {L.ROLE_PREFILL: [], L.ROLE_DECODE: []}
    for group in worker_groups(spec, plan):
        for role, _ in group.segments:
            # A colocated instance is its own prefill and decode instance.
            for as_role in (L.ROLE_PREFILL, L.ROLE_DECODE) if role == L.ROLE_COLOCATED else (role,):
                out[as_role].append(group)
    for groups in out.values():
        groups.sort(key=lambda g: g.stage)
    return out


def shared_pod_layout(spec: DistServeDeploymentSpec, plan: PlanStatus) -> bool:
    """SharedPod pairs stage i of prefill with stage i of decode: it needs matching shapes."""
    return (
        plan.mode is not PlanMode.COLOCATED
        and plan.affinity is PlacementAffinity.LOW
        and spec.placement.stage_layout is StageLayout.SHARED_POD
        and plan.prefill.pp == plan.decode.pp
        and plan.prefill.replicas == plan.decode.replicas
    )


def worker_groups(spec: DistServeDeploymentSpec, plan: PlanStatus) -> list[WorkerGroup]:
    """Every worker StatefulSet of the plan, each with the plan's revision."""
    rev = revision(plan)
    return [dataclasses.replace(g, revision=rev) for g in _shape_groups(spec, plan)]


def _shape_groups(spec: DistServeDeploymentSpec, plan: PlanStatus) -> list[WorkerGroup]:
    if plan.mode is PlanMode.COLOCATED and plan.colocated is not None:
        # serving.mode Colocated: one StatefulSet per stage of colocated instances, no prefill or decode.
        c = plan.colocated
        phase = PhasePlan(tp=c.tp, pp=c.pp, replicas=c.replicas, stage_layers=c.stage_layers)
        return [
            WorkerGroup(L.ROLE_COLOCATED, i, c.replicas, ((L.ROLE_COLOCATED, phase),)) for i in range(c.pp)
        ]
    if shared_pod_layout(spec, plan):
        segments = ((L.ROLE_PREFILL, plan.prefill), (L.ROLE_DECODE, plan.decode))
        return [
            WorkerGroup(L.ROLE_PAIRED, i, plan.prefill.replicas, segments) for i in range(plan.prefill.pp)
        ]
    groups = []
    for role, phase in ((L.ROLE_PREFILL, plan.prefill), (L.ROLE_DECODE, plan.decode)):
        groups += [WorkerGroup(role, i, phase.replicas, ((role, phase),)) for i in range(phase.pp)]
    return groups


def ports(spec: DistServeDeploymentSpec, role: str, shared: bool) -> tuple[int, int]:
    """(gRPC, metrics) ports of a role's container; in a shared pod decode takes the next ones."""
    offset = 1 if shared and role == L.ROLE_DECODE else 0
    return spec.worker.grpc_port + offset, spec.worker.metrics_port + offset


def rank_ports(spec: DistServeDeploymentSpec, role: str, shared: bool, tp: int) -> list[int]:
    """gRPC ports of an instance's tensor-parallel follower ranks 1..tp-1 (same pod as rank 0)."""
    base = rank_port_base(ports(spec, role, shared)[0], role)
    return [base + r for r in range(1, tp)]


def parallelism_hash(plan: PlanStatus) -> str:
    """Changes when a pod's shape changes (tp, pp, stage split, placement), not when only replica
    counts do."""
    shape = {
        "prefill": [plan.prefill.tp, plan.prefill.pp, plan.prefill.stage_layers],
        "decode": [plan.decode.tp, plan.decode.pp, plan.decode.stage_layers],
        "affinity": plan.affinity.value,
    }
    if plan.mode is PlanMode.COLOCATED and plan.colocated is not None:  # absent: old hashes unchanged
        shape["colocated"] = [plan.colocated.tp, plan.colocated.pp, plan.colocated.stage_layers]
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def revision(plan: PlanStatus) -> str:
    """The short shape hash in worker object names and the REVISION label."""
    return parallelism_hash(plan)[:6]


# ---------------------------------------------------------------------------- the plan


def stage_endpoints(
    name: str, spec: DistServeDeploymentSpec, plan: PlanStatus, namespace: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(services, addresses): role -> per stage, the DNS name of the stage's headless Service
    (`<sts>.<namespace>.svc`) and the gRPC address template of its pod in one instance
    (`<sts>-{ordinal}.<sts>.<namespace>.svc:<port>`, the worker fills in its ordinal)."""
    shared = shared_pod_layout(spec, plan)
    services: dict[str, list[str]] = {}
    addresses: dict[str, list[str]] = {}
    for role, groups in stage_groups(spec, plan).items():
        grpc_port = ports(spec, role, shared)[0]
        services[role] = [f"{stage_service_name(name, g)}.{namespace}.svc" for g in groups]
        addresses[role] = [
            f"{g.name(name)}-{{ordinal}}.{stage_service_name(name, g)}.{namespace}.svc:{grpc_port}"
            for g in groups
        ]
    return services, addresses


def plan_document(
    name: str, spec: DistServeDeploymentSpec, plan: PlanStatus, *, namespace: str
) -> dict[str, Any]:
    """`plan.json`: the runtime contract for this deployment's pods (their ports, the Services
    and addresses of their stages in `namespace`)."""
    shared = shared_pod_layout(spec, plan)
    services, addresses = stage_endpoints(name, spec, plan, namespace)
    contract = runtime_contract(
        spec,
        plan,
        ports={role: ports(spec, role, shared) for role in (L.ROLE_PREFILL, L.ROLE_DECODE)},
        services=services,
        addresses=addresses,
    )
    return contract.to_wire()


def render_plan_configmap(
    name: str, spec: DistServeDeploymentSpec, plan: PlanStatus, *, namespace: str, for_workers: bool = False
) -> Obj:
    """The router's plan, or (`for_workers`) the revision's copy its worker pods mount."""
    document = plan_document(name, spec, plan, namespace=namespace)
    labels = L.base(name, L.COMPONENT_PLAN)
    rev = revision(plan) if for_workers else ""
    if rev:
        labels[L.REVISION] = rev
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": plan_configmap_name(name, rev), "labels": labels},
        "data": {PLAN_KEY: json.dumps(document, indent=2, sort_keys=True)},
    }


# ---------------------------------------------------------------------------- pods


def container_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def model_volumes(spec: DistServeDeploymentSpec) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """(volumes, mounts, env) for the model weights."""
    source = spec.model.source
    if source.kind is SourceKind.PVC:
        return (
            [{"name": "model", "persistentVolumeClaim": {"claimName": source.claim_name, "readOnly": True}}],
            [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True}],
            # The worker resolves a PVC source's `path` under this root (model_source.py).
            [{"name": "DISTSERVE_MODEL_ROOT", "value": MODEL_DIR}],
        )
    if source.kind is SourceKind.HUGGING_FACE and source.host_cache_path:
        return (
            [{"name": "hf-cache", "hostPath": {"path": source.host_cache_path, "type": "Directory"}}],
            [{"name": "hf-cache", "mountPath": f"{MODEL_DIR}/hf-cache", "readOnly": True}],
            [{"name": "HF_HOME", "value": f"{MODEL_DIR}/hf-cache"}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
        )
    return [], [], []


def worker_resources(spec: DistServeDeploymentSpec, gpus: int) -> Obj:
    requests = dict(spec.worker.resources.requests)
    limits = dict(spec.worker.resources.limits)
    if spec.cluster.gpu.type is not GpuType.CPU:
        # Extended resources must be equal in requests and limits.
        requests[spec.cluster.gpu.resource_name] = str(gpus)
        limits[spec.cluster.gpu.resource_name] = str(gpus)
    out: Obj = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def drain_seconds(spec: DistServeDeploymentSpec) -> int:
    """How long a worker drains on SIGTERM: its pod's grace period less a margin."""
    return max(1, spec.worker.termination_grace_period_seconds - DRAIN_MARGIN_SECONDS)


def _worker_container(
    spec: DistServeDeploymentSpec, role: str, phase: PhasePlan, stage: int, shared: bool
) -> Obj:
    grpc_port, metrics_port = ports(spec, role, shared)
    _, mounts, model_env = model_volumes(spec)
    # Follower ranks serve gRPC in this pod too: decode ranks pull their KV heads from them.
    followers = [
        {"name": f"{role}-rank{r}", "containerPort": port, "protocol": "TCP"}
        for r, port in enumerate(rank_ports(spec, role, shared, phase.tp), start=1)
    ]
    return {
        "name": role,
        "image": spec.worker.image,
        "imagePullPolicy": spec.worker.image_pull_policy.value,
        "command": [
            "distserve",
            "worker",
            role,
            "--plan-file",
            PLAN_FILE,
            # Its layers, tp and engine limits come from the plan file's entry for this stage.
            "--stage",
            str(stage),
            "--host",
            "0.0.0.0",
            "--port",
            str(grpc_port),
            "--http-port",
            str(metrics_port),
            # The address peers reach this instance at; Kubernetes expands $(POD_IP) from env.
            "--advertise",
            f"$(POD_IP):{grpc_port}",
            # On SIGTERM: stop taking work, finish what it holds, exit before the kubelet kills it.
            "--drain-seconds",
            str(drain_seconds(spec)),
        ],
        "ports": [
            {"name": f"grpc-{role}", "containerPort": grpc_port, "protocol": "TCP"},
            {"name": f"metrics-{role}", "containerPort": metrics_port, "protocol": "TCP"},
            *followers,
        ],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "HOME", "value": "/tmp"},
            # DISTSERVE_* variables only where the worker reads them (a contract test checks).
            *model_env,
            *({"name": e.name, "value": e.value} for e in spec.worker.env),
        ],
        "resources": worker_resources(spec, phase.tp),
        "readinessProbe": {
            # /readyz: model loaded and serving; /healthz only says the process is alive.
            "httpGet": {"path": "/readyz", "port": metrics_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": metrics_port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "startupProbe": {
            # Loading weights takes minutes on big models; liveness would kill it meanwhile.
            "httpGet": {"path": "/healthz", "port": metrics_port},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *mounts,
        ],
    }


def low_anchor(plan: PlanStatus, role: str, stage: int) -> int | None:
    """Under Low affinity, the prefill stage whose node this stage must share, or None.

    A pipeline spans `nodeSpan` nodes and node j holds segment j of both phases: the same layers,
    pp / nodeSpan consecutive stages of each (the phases' depths may differ). Every stage of
    segment j sits with prefill stage j x (prefill pp / nodeSpan), the segment's first: the KV
    cache then crosses NVLink, not the network, and a segment's stages hand on over NVLink."""
    span = max(1, plan.node_span)
    k_p = max(1, plan.prefill.pp // span)
    if role == L.ROLE_DECODE:
        return (stage // max(1, plan.decode.pp // span)) * k_p
    if role == L.ROLE_PREFILL and stage % k_p:
        return stage - stage % k_p
    return None


def _affinity(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus, group: WorkerGroup) -> Obj:
    anchor = low_anchor(plan, group.role, group.stage) if plan.affinity is PlacementAffinity.LOW else None
    if anchor is not None:
        return {
            "podAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {
                            "matchLabels": {
                                L.APP_INSTANCE: name,
                                L.ROLE: L.ROLE_PREFILL,
                                L.STAGE: str(anchor),
                                L.REVISION: group.revision,
                            }
                        },
                        "topologyKey": L.HOSTNAME_TOPOLOGY,
                    }
                ]
            }
        }
    if plan.affinity is PlacementAffinity.HIGH:
        # Fast cross-node links: spread instances so one node failure takes few of them down.
        return {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {
                                "matchLabels": {
                                    L.APP_INSTANCE: name,
                                    L.ROLE: group.role,
                                    L.STAGE: str(group.stage),
                                    L.REVISION: group.revision,
                                }
                            },
                            "topologyKey": L.HOSTNAME_TOPOLOGY,
                        },
                    }
                ]
            }
        }
    return {}


def _group_labels(name: str, group: WorkerGroup) -> dict[str, str]:
    out = {
        **L.base(name, L.COMPONENT_WORKER),
        L.ROLE: group.role,
        L.STAGE: str(group.stage),
        L.REVISION: group.revision,
    }
    for role, _ in group.segments:
        # A colocated pod serves both: the router's role Services select it as either.
        for key in (
            (L.SERVES_PREFILL, L.SERVES_DECODE)
            if role == L.ROLE_COLOCATED
            else (L.SERVES_PREFILL if role == L.ROLE_PREFILL else L.SERVES_DECODE,)
        ):
            out[key] = "true"
    return out


def _group_selector(name: str, group: WorkerGroup) -> dict[str, str]:
    """Selects exactly the pods of one stage StatefulSet (it and its Service use it)."""
    return {
        L.APP_INSTANCE: name,
        L.APP_COMPONENT: L.COMPONENT_WORKER,
        L.ROLE: group.role,
        L.STAGE: str(group.stage),
        L.REVISION: group.revision,
    }


def pod_placement(spec: DistServeDeploymentSpec) -> Obj:
    """nodeSelector, tolerations and service account of every worker pod (and the profiling Job's)."""
    out: Obj = {}
    if spec.cluster.node_selector:
        out["nodeSelector"] = dict(spec.cluster.node_selector)
    if spec.cluster.tolerations:
        out["tolerations"] = [t.to_wire() for t in spec.cluster.tolerations]
    if spec.worker.service_account_name:
        out["serviceAccountName"] = spec.worker.service_account_name
    return out


def render_statefulset(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus, group: WorkerGroup) -> Obj:
    shared = group.role == L.ROLE_PAIRED
    selector = _group_selector(name, group)
    pod_labels = _group_labels(name, group)
    volumes, _, _ = model_volumes(spec)
    pod_spec: Obj = {
        "securityContext": pod_security_context(),
        "containers": [
            _worker_container(spec, role, phase, group.stage, shared) for role, phase in group.segments
        ],
        "volumes": [
            {"name": "plan", "configMap": {"name": plan_configmap_name(name, group.revision)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            *volumes,
        ],
        # The worker drains on SIGTERM (stops taking work, finishes what it holds) for this long
        # less DRAIN_MARGIN_SECONDS, so it exits on its own before the kubelet's SIGKILL.
        "terminationGracePeriodSeconds": spec.worker.termination_grace_period_seconds,
        "enableServiceLinks": False,
    }
    pod_spec.update(pod_placement(spec))
    affinity = _affinity(name, spec, plan, group)
    if affinity:
        pod_spec["affinity"] = affinity
    if spec.placement.gang_scheduling is GangScheduling.POD_GROUP:
        # The pod's PodGroup depends on its ordinal, which a StatefulSet template cannot express:
        # pods start gated, the operator labels each with its instance's PodGroup and lifts the gate.
        pod_spec["schedulingGates"] = [{"name": GANG_GATE}]
        pod_spec["schedulerName"] = GANG_SCHEDULER
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": group.name(name), "labels": pod_labels},
        "spec": {
            "replicas": group.replicas,
            # Its own headless Service: pod k is `<sts>-<k>.<sts>.<namespace>.svc`.
            "serviceName": stage_service_name(name, group),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {L.PLAN_HASH_ANNOTATION: parallelism_hash(plan)},
                },
                "spec": pod_spec,
            },
        },
    }


GANG_GATE = "distserve.io/gang"
GANG_SCHEDULER = "scheduler-plugins-scheduler"


def pod_group_name(name: str, role: str, instance: int, revision: str = "") -> str:
    short = "pd" if role == L.ROLE_PAIRED else role
    return f"{name}-{short}-{revision}-i{instance}" if revision else f"{name}-{short}-i{instance}"


def render_pod_groups(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus) -> list[Obj]:
    if spec.placement.gang_scheduling is not GangScheduling.POD_GROUP:
        return []
    groups = worker_groups(spec, plan)
    rev = revision(plan)
    out = []
    for role in dict.fromkeys(g.role for g in groups):
        stages = [g for g in groups if g.role == role]
        for k in range(stages[0].replicas):
            out.append(
                {
                    "apiVersion": POD_GROUP_API,
                    "kind": "PodGroup",
                    "metadata": {
                        "name": pod_group_name(name, role, k, rev),
                        "labels": {**L.base(name, L.COMPONENT_WORKER), L.ROLE: role, L.REVISION: rev},
                    },
                    "spec": {"minMember": len(stages), "scheduleTimeoutSeconds": 600},
                }
            )
    return out


def ungate_patch(pod: Obj) -> Obj | None:
    """The patch joining a gated worker pod to the PodGroup of its instance (its StatefulSet
    ordinal) and removing our scheduling gate; None when the pod is not ours to ungate."""
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    if not any(g.get("name") == GANG_GATE for g in gates):
        return None
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    instance, role = labels.get(L.APP_INSTANCE), labels.get(L.ROLE)
    ordinal = labels.get("apps.kubernetes.io/pod-index") or meta.get("name", "").rsplit("-", 1)[-1]
    if not instance or not role or not str(ordinal).isdigit():
        return None
    rev = labels.get(L.REVISION, "")
    return {
        "metadata": {"labels": {L.POD_GROUP: pod_group_name(instance, role, int(ordinal), rev)}},
        "spec": {"schedulingGates": [g for g in gates if g.get("name") != GANG_GATE]},
    }


# ---------------------------------------------------------------------------- services, router, policy


def render_stage_services(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus) -> list[Obj]:
    """One headless Service per stage StatefulSet, governing it: stable DNS names for its pods,
    published before they are ready (the stages of an instance connect while they start)."""
    out = []
    for group in worker_groups(spec, plan):
        shared = group.role == L.ROLE_PAIRED
        service_ports: list[Obj] = []
        for role, _ in group.segments:
            grpc_port, metrics_port = ports(spec, role, shared)
            service_ports += [
                {"name": f"grpc-{role}", "port": grpc_port, "targetPort": f"grpc-{role}", "protocol": "TCP"},
                {
                    "name": f"metrics-{role}",
                    "port": metrics_port,
                    "targetPort": f"metrics-{role}",
                    "protocol": "TCP",
                },
            ]
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": stage_service_name(name, group),
                    "labels": {
                        **L.base(name, L.COMPONENT_WORKER),
                        L.ROLE: group.role,
                        L.STAGE: str(group.stage),
                        L.REVISION: group.revision,
                    },
                },
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,
                    "selector": _group_selector(name, group),
                    "ports": service_ports,
                },
            }
        )
    return out


def render_role_services(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus) -> list[Obj]:
    """The headless Services the router resolves: stage-0 pods only, since stage 0 of an
    instance is the one it calls (stage 0 reaches the instance's other stages itself)."""
    out = []
    for role, serves in ((L.ROLE_PREFILL, L.SERVES_PREFILL), (L.ROLE_DECODE, L.SERVES_DECODE)):
        # Colocated pods name their one container's ports after it.
        port_role = L.ROLE_COLOCATED if plan.mode is PlanMode.COLOCATED else role
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": role_service_name(name, role),
                    "labels": {**L.base(name, L.COMPONENT_WORKER), L.ROLE: role},
                },
                "spec": {
                    "clusterIP": "None",
                    "selector": {
                        L.APP_INSTANCE: name,
                        L.APP_COMPONENT: L.COMPONENT_WORKER,
                        serves: "true",
                        L.STAGE: "0",
                    },
                    "ports": [
                        {
                            "name": "grpc",
                            "port": spec.worker.grpc_port,
                            "targetPort": f"grpc-{port_role}",
                            "protocol": "TCP",
                        },
                        {
                            "name": "metrics",
                            "port": spec.worker.metrics_port,
                            "targetPort": f"metrics-{port_role}",
                            "protocol": "TCP",
                        },
                    ],
                },
            }
        )
    return out


def render_router(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus) -> list[Obj]:
    port = spec.router.port
    shared = shared_pod_layout(spec, plan)
    pod_labels = {**L.base(name, L.COMPONENT_ROUTER), L.ROLE: L.ROLE_ROUTER}
    selector = {L.APP_INSTANCE: name, L.APP_COMPONENT: L.COMPONENT_ROUTER}
    container = {
        "name": "router",
        "image": spec.router.image or spec.worker.image,
        "imagePullPolicy": spec.worker.image_pull_policy.value,
        "command": [
            "distserve",
            "worker",
            "router",
            "--plan-file",
            PLAN_FILE,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            # Headless Services: the router resolves every instance behind them.
            "--prefill-dns",
            f"{role_service_name(name, L.ROLE_PREFILL)}.$(POD_NAMESPACE).svc",
            "--decode-dns",
            f"{role_service_name(name, L.ROLE_DECODE)}.$(POD_NAMESPACE).svc",
            "--prefill-port",
            str(ports(spec, L.ROLE_PREFILL, shared)[0]),
            "--decode-port",
            str(ports(spec, L.ROLE_DECODE, shared)[0]),
            # Overload: how many requests wait for a saturated role, and for how long.
            "--max-queue",
            str(spec.router.max_queue),
            "--queue-timeout-seconds",
            str(spec.router.queue_timeout_seconds),
        ],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "HOME", "value": "/tmp"},
        ],
        "resources": ROUTER_RESOURCES,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 10},
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    volumes: list[Obj] = [
        {"name": "plan", "configMap": {"name": plan_configmap_name(name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    ref = spec.router.auth.api_key_secret_ref
    if ref is not None:
        container["command"] += ["--api-key-file", API_KEYS_FILE]
        container["volumeMounts"].append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": API_KEYS_FILE.rsplit("/", 1)[1]}],
                    "defaultMode": 0o440,
                },
            }
        )
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "labels": pod_labels},
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": volumes,
                    "enableServiceLinks": False,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": pod_labels},
        "spec": {
            "type": spec.router.service_type.value,
            "selector": selector,
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def render_network_policy(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus) -> Obj:
    shared = shared_pod_layout(spec, plan)
    roles = {L.ROLE_PREFILL: plan.prefill, L.ROLE_DECODE: plan.decode}
    grpc_ports: list[Obj] = [
        {"protocol": "TCP", "port": p} for p in sorted({ports(spec, role, shared)[0] for role in roles})
    ]
    for role in roles:
        # Every follower port a role may use, whatever this plan's tp: during a staged rollout the
        # old revision's ranks (another tp) still serve KV pulls until they have drained.
        followers = rank_ports(spec, role, shared, MAX_TP)
        grpc_ports.append({"protocol": "TCP", "port": followers[0], "endPort": followers[-1]})
    metrics_ports = sorted({ports(spec, role, shared)[1] for role in roles})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-workers", "labels": L.base(name, L.COMPONENT_WORKER)},
        "spec": {
            "podSelector": {"matchLabels": {L.APP_INSTANCE: name, L.APP_COMPONENT: L.COMPONENT_WORKER}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    # gRPC (requests, KV pulls, rank ports): only this deployment's router and workers.
                    "from": [
                        {"podSelector": {"matchLabels": {L.APP_INSTANCE: name, L.APP_NAME: L.NAME_VALUE}}}
                    ],
                    "ports": grpc_ports,
                },
                {
                    # Metrics and health: scrapers anywhere in the cluster.
                    "ports": [{"protocol": "TCP", "port": p} for p in metrics_ports],
                },
            ],
        },
    }


# ---------------------------------------------------------------------------- all of it


def render_all(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus, *, namespace: str) -> list[Obj]:
    """Every child, in the order to apply them (config before the pods that mount it, Services
    before the StatefulSets they govern). `namespace`: where they go (the plan names stage pods
    by their DNS names there)."""
    objs: list[Obj] = [
        render_plan_configmap(name, spec, plan, namespace=namespace),
        render_plan_configmap(name, spec, plan, namespace=namespace, for_workers=True),
    ]
    objs += render_role_services(name, spec, plan)
    objs += render_stage_services(name, spec, plan)
    objs.append(render_network_policy(name, spec, plan))
    objs += render_pod_groups(name, spec, plan)
    objs += [render_statefulset(name, spec, plan, g) for g in worker_groups(spec, plan)]
    objs += render_router(name, spec, plan)
    return objs


def scaled_by_operator(obj: Obj, mode: AutoscalingMode) -> bool:
    """Whether the operator sets `spec.replicas` of an existing object (External leaves it to HPA/KEDA)."""
    return not (mode is AutoscalingMode.EXTERNAL and obj["kind"] == "StatefulSet")


def role_replicas(name: str, spec: DistServeDeploymentSpec, plan: PlanStatus) -> dict[str, tuple[str, int]]:
    """status role name -> (StatefulSet name, desired replicas), router included."""
    out = {g.status_name: (g.name(name), g.replicas) for g in worker_groups(spec, plan)}
    out[L.ROLE_ROUTER] = (router_name(name), spec.router.replicas)
    return out
