"""Profiling on the cluster's own GPUs (spec.planner.profiling.mode Auto): the pure decisions.

What the operator stores and runs, keyed by (model, GPU type, dtype), so that every deployment of
the same model on the same GPUs shares one Job and one stored profile:

- The stored profile: ConfigMap `distserve-profile-<hash>` (key `profile.json`) in the deployment's
  namespace, found by label selector (the sanitised model, GPU type and dtype; the full values are in
  annotations and checked, as sanitising may map two models onto one label value). A profile measured
  elsewhere becomes the stored one by carrying these labels and annotations.
- The Job: `distserve-profile-<hash>-<attempt>` running `distserve profile --tp 1,2,...` in the
  worker image, with the worker pods' node selector, tolerations, model volumes and GPU resource: it
  measures every TP size the search considers (one node's GPUs) and asks for the largest's GPUs.

How the result gets back (the design needing the least RBAC): the Job's pod writes the fitted profile,
compacted, to its termination message, and the operator, which already reads pods, stores it in the
ConfigMap itself. The pod gets no service-account token and no Role; the operator needs only
get/list/create/delete on Jobs. A termination message holds 4096 bytes: a `distserve profile` file is
~0.5 KB compacted plus ~0.3 KB per measured TP size (TP sizes the model's heads do not divide are
skipped, so an 8-GPU node gives at most TP 1, 2, 4, 8 for most models); the pod fails with a clear
message if a profile ever outgrows it.

Why the deployment's namespace (not one operator-wide): the Job needs the model where the workers
find it (a PVC, a host cache, pull secrets through the worker's service account), all namespaced, and
a namespaced operator may write nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from . import children, conditions
from . import labels as L
from .api import (
    Condition,
    ConditionStatus,
    ConditionType,
    DistServeDeploymentSpec,
    DistServeDeploymentStatus,
    GpuType,
    ProfilingMode,
)
from .api.spec import MAX_TP

Obj = dict[str, Any]

PROFILE_KEY_IN_CONFIGMAP = "profile.json"
CONTAINER = "profile"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of one container's message
PROFILE_FILE = "/tmp/profile.json"

# The Job's command: `distserve profile`, then the compacted profile into the termination message.
# argv: the message path, the profile file, then the profile flags. Python, not a shell: no quoting
# of model names.
RUNNER = """\
import json, sys
from distserve_operator.cli import main
message, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
rc = main(["profile", *flags, "--output", out])
if rc:
    sys.exit(rc)
with open(out, encoding="utf-8") as f:
    text = json.dumps(json.load(f), separators=(",", ":"))
if len(text.encode()) > LIMIT:
    sys.exit(f"the profile is {len(text.encode())} bytes compacted, over the LIMIT of a termination "
             "message; store it yourself (kubectl create configmap) with the labels the operator looks for")
with open(message, "w", encoding="utf-8") as f:
    f.write(text)
""".replace("LIMIT", str(TERMINATION_MESSAGE_LIMIT))

_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9._-]+")


class Phase(StrEnum):
    """The Profiled condition's reasons."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # Stored, but the planner found no plan with it: the running plan stays, no re-plan until the
    # stored profile changes (delete its ConfigMap to measure again).
    REJECTED = "Rejected"


def wanted(spec: DistServeDeploymentSpec) -> bool:
    """Auto profiling applies: mode Auto and no profile given in the spec."""
    planner = spec.planner
    return (
        planner.profiling.mode is ProfilingMode.AUTO
        and planner.profile is None
        and not planner.profile_config_map
    )


def label_value(text: str) -> str:
    """`text` as a valid label value: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends.
    Lossy (the full value goes in an annotation); a shortened value keeps a hash of the whole."""
    value = _LABEL_VALUE_BAD.sub("-", text).strip("-._")
    if len(value) > 63:
        value = value[:52].rstrip("-._") + "-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    return value


@dataclass(frozen=True)
class ProfileKey:
    """What a profile is valid for: one model, on one GPU type, in one dtype."""

    model: str
    gpu: str
    dtype: str

    @property
    def hash(self) -> str:
        raw = json.dumps([self.model, self.gpu, self.dtype])
        return hashlib.sha256(raw.encode()).hexdigest()[:10]

    @property
    def config_map_name(self) -> str:
        return f"distserve-profile-{self.hash}"

    def job_name(self, attempt: int) -> str:
        return f"distserve-profile-{self.hash}-{attempt}"

    def describe(self) -> str:
        return f"{self.model} on {self.gpu} in {self.dtype}"

    def selector(self) -> dict[str, str]:
        """Selects the stored profile (label values only: annotations are checked by `matches`)."""
        return {
            L.APP_COMPONENT: L.COMPONENT_PROFILE,
            L.PROFILE_MODEL: label_value(self.model),
            L.PROFILE_GPU: label_value(self.gpu),
            L.PROFILE_DTYPE: label_value(self.dtype),
        }

    def labels(self) -> dict[str, str]:
        return {
            L.APP_NAME: L.NAME_VALUE,
            L.APP_MANAGED_BY: L.MANAGER_VALUE,
            **self.selector(),
            L.PROFILE_KEY: self.hash,
        }

    def job_selector(self) -> dict[str, str]:
        return {L.APP_COMPONENT: L.COMPONENT_PROFILE, L.PROFILE_KEY: self.hash}

    def annotations(self) -> dict[str, str]:
        return {L.PROFILE_MODEL: self.model, L.PROFILE_GPU: self.gpu, L.PROFILE_DTYPE: self.dtype}

    def matches(self, obj: Obj) -> bool:
        """Whether a labelled ConfigMap is for exactly this key (its annotations hold the full values)."""
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return all(annotations.get(k) == v for k, v in self.annotations().items())


def key_of(spec: DistServeDeploymentSpec) -> ProfileKey:
    gpu = spec.cluster.gpu
    name = gpu.type.value
    if gpu.type is GpuType.CUSTOM:  # Custom GPUs differ: their figures are part of the key
        name = f"Custom-{gpu.memory_gi_b}GiB-{gpu.tflops}TFLOPs-{gpu.hbm_g_bps}GBps"
    return ProfileKey(model=spec.model.name, gpu=name, dtype=spec.model.dtype.value)


def searched_tp(spec: DistServeDeploymentSpec) -> tuple[int, ...]:
    """TP sizes the planner's search considers: within one node (TP all-reduces every layer)."""
    return tuple(range(1, min(spec.cluster.gpus_per_node, MAX_TP) + 1))


def job_tp(spec: DistServeDeploymentSpec) -> tuple[int, ...]:
    """TP sizes the Job measures (`distserve profile --tp`): every size the search considers, all
    within one node, so the Job's pod holds the largest's GPUs. The planner models PP on top of
    each TP entry; a TP size without one is not planned. Sizes the model's heads do not divide are
    passed too: the CLI skips them with the reason, as the search does."""
    return searched_tp(spec)


def profile_flags(spec: DistServeDeploymentSpec) -> list[str]:
    """`distserve profile` flags for this spec's model as the workers load it, at every TP size
    the Job measures."""
    source = spec.model.source
    flags = ["--model-name", spec.model.name, "--model-source", source.kind.value]
    if source.path:
        flags += ["--model-path", source.path]
    if source.gguf_file:
        flags += ["--gguf-file", source.gguf_file]
    device = "cpu" if spec.cluster.gpu.type is GpuType.CPU else "cuda"
    tp = ",".join(map(str, job_tp(spec)))
    return [*flags, "--dtype", spec.model.dtype.value, "--device", device, "--tp", tp]


def render_config_map(key: ProfileKey, text: str, job_name: str) -> Obj:
    """The stored profile. No owner: it outlives the deployments that use it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": key.config_map_name,
            "labels": key.labels(),
            "annotations": {**key.annotations(), "distserve.io/profiled-by": job_name},
        },
        "data": {PROFILE_KEY_IN_CONFIGMAP: text},
    }


PREVIOUS_FAILURE = "distserve.io/profile-previous-failure"
# Longer than the backoff cap's default (6 h): a failed Job waiting for its retry is still there.
ABANDONED_JOB_TTL_SECONDS = 24 * 3600


def render_job(
    spec: DistServeDeploymentSpec,
    key: ProfileKey,
    *,
    attempt: int,
    deadline_seconds: int,
    previous_failure: str = "",
) -> Obj:
    """The profiling Job: the worker pods' image, placement, model volumes and GPU resource.
    No owner reference (deployments of the same model share it; the operator deletes it once the
    profile is stored). backoffLimit 0: the operator retries with its own backoff, and one pod's
    failure is the message. activeDeadlineSeconds bounds a Job that never finds a node."""
    tps = job_tp(spec)
    volumes, mounts, model_env = children.model_volumes(spec)
    labels = {**key.labels(), L.PROFILE_ATTEMPT: str(attempt)}
    container: Obj = {
        "name": CONTAINER,
        "image": spec.worker.image,
        "imagePullPolicy": spec.worker.image_pull_policy.value,
        "command": ["python", "-c", RUNNER, TERMINATION_MESSAGE_PATH, PROFILE_FILE, *profile_flags(spec)],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            *model_env,
            *({"name": e.name, "value": e.value} for e in spec.worker.env),
        ],
        "resources": children.worker_resources(spec, max(tps)),
        "securityContext": children.container_security_context(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        # On failure with no message written, the log's tail is the message: the error it printed.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *mounts,
        ],
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "securityContext": children.pod_security_context(),
        # The result travels in the termination message: the pod needs no API access.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            *volumes,
        ],
        **children.pod_placement(spec),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": key.job_name(attempt),
            "labels": labels,
            "annotations": {
                **key.annotations(),
                L.PROFILE_ATTEMPT: str(attempt),
                "distserve.io/profile-tp": ",".join(map(str, tps)),
                # The failed attempt is deleted with its pod: its story stays with its successor.
                **({PREVIOUS_FAILURE: previous_failure[:2000]} if previous_failure else {}),
            },
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline_seconds,
            # A Job no deployment comes back for (all deleted meanwhile) goes away on its own; one
            # that some deployment wants is read within a resync and deleted by the operator.
            "ttlSecondsAfterFinished": ABANDONED_JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def attempt_of(job: Obj) -> int:
    meta = job.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(L.PROFILE_ATTEMPT) or (meta.get("annotations") or {}).get(
        L.PROFILE_ATTEMPT
    )
    try:
        return max(1, int(raw or 1))
    except ValueError:
        return 1


def latest(jobs: list[Obj]) -> Obj | None:
    return max(jobs, key=attempt_of, default=None)


def backoff_seconds(attempt: int, *, base: float, cap: float) -> float:
    """How long after the `attempt`-th failure the next attempt starts: doubling, capped."""
    return float(min(cap, base * 2 ** max(0, min(attempt - 1, 62))))


@dataclass(frozen=True)
class JobState:
    phase: Phase
    message: str = ""  # why (a failure's reason, a pending pod's scheduling message)
    finished: datetime | None = None  # when it failed or succeeded
    result: str | None = None  # the profile text from the pod's termination message (Succeeded)


def _terminated(pod: Obj) -> Obj:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return ((status.get("state") or {}).get("terminated")) or {}
    return {}


def job_state(job: Obj, pods: list[Obj]) -> JobState:
    """Where a profiling Job is, from its status and its pods'."""
    status = job.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    created = conditions.parse_time((job.get("metadata") or {}).get("creationTimestamp"))
    if "Complete" in conds or int(status.get("succeeded") or 0) > 0:
        finished = conditions.parse_time(status.get("completionTime")) or conditions.parse_time(
            conds.get("Complete", {}).get("lastTransitionTime")
        )
        for pod in pods:
            message = _terminated(pod).get("message")
            if (pod.get("status") or {}).get("phase") == "Succeeded" and message:
                return JobState(Phase.SUCCEEDED, finished=finished or created, result=message)
        return JobState(
            Phase.FAILED,
            "the Job succeeded but its pod's termination message (the profile) is gone: the pod was "
            "deleted before the operator read it",
            finished=finished or created,
        )
    if "Failed" in conds or int(status.get("failed") or 0) > 0:
        cond = conds.get("Failed", {})
        parts = [f"{cond['reason']}: {cond.get('message', '')}".rstrip(": ")] if cond.get("reason") else []
        for pod in pods:
            term = _terminated(pod)
            if term:
                detail = (term.get("message") or "").strip().splitlines()
                parts.append(
                    f"exit code {term.get('exitCode')} ({term.get('reason') or 'Error'})"
                    + (f": {' | '.join(detail[-5:])}" if detail else "")
                )
        finished = conditions.parse_time(cond.get("lastTransitionTime")) or conditions.parse_time(
            status.get("completionTime")
        )
        return JobState(Phase.FAILED, "; ".join(parts) or "the Job failed", finished=finished or created)
    running = int(status.get("ready") or 0) > 0 or any(
        (p.get("status") or {}).get("phase") == "Running" for p in pods
    )
    if running:
        return JobState(Phase.RUNNING)
    # Why it waits: no node yet (the scheduler's message), or a container not started (a bad image
    # waits in ImagePullBackOff until activeDeadlineSeconds: say so now).
    waiting = [
        c.get("message") or c.get("reason") or ""
        for p in pods
        for c in (p.get("status") or {}).get("conditions") or []
        if c.get("type") == "PodScheduled" and c.get("status") == "False"
    ] + [
        ": ".join(x for x in (w.get("reason"), w.get("message")) if x)
        for p in pods
        for cs in (p.get("status") or {}).get("containerStatuses") or []
        if (w := (cs.get("state") or {}).get("waiting") or {})
    ]
    return JobState(Phase.PENDING, "; ".join(w for w in waiting if w))


@dataclass(frozen=True)
class Outcome:
    """What the Profiled condition says, and the stored profile's ConfigMap once there is one."""

    phase: Phase
    message: str
    config_map: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.phase is Phase.SUCCEEDED


def retry_due(state: JobState, attempt: int, *, base: float, cap: float, now: datetime) -> datetime | None:
    """When the next attempt after a failed one starts (None: now)."""
    finished = state.finished or now
    due = finished + timedelta(seconds=backoff_seconds(attempt, base=base, cap=cap))
    return due if due > now else None


def plan_uses(plan_profile: str, namespace: str, config_map: str) -> bool:
    """Whether a plan (status.plan.profile) was made with the stored profile in this ConfigMap: its
    description starts `ConfigMap <ns>/<name>: <source>` or `ConfigMap <ns>/<name> (<model> on ...)`."""
    where = f"ConfigMap {namespace}/{config_map}"
    return plan_profile.startswith((f"{where}:", f"{where} (")) or plan_profile == where


def replan_with(outcome: Outcome, plan_profile: str, namespace: str) -> bool:
    """Whether to re-plan now: a stored profile the running plan was not made with."""
    return bool(outcome.succeeded and outcome.config_map) and not plan_uses(
        plan_profile, namespace, outcome.config_map or ""
    )


def rejected(outcome: Outcome, why: str) -> Outcome:
    return Outcome(
        Phase.REJECTED,
        f"{outcome.message}, but the planner found no plan with it ({why}); the running plan stays; fix: "
        f"delete ConfigMap {outcome.config_map} to profile again",
        config_map=outcome.config_map,
    )


def keep_rejection(previous: Condition | None, outcome: Outcome | None) -> Outcome | None:
    """A stored profile the planner rejected stays rejected (no re-plan at every resync) while the
    same ConfigMap holds it."""
    if (
        outcome is not None
        and outcome.succeeded
        and previous is not None
        and previous.reason == Phase.REJECTED.value
        and previous.message.endswith(f"delete ConfigMap {outcome.config_map} to profile again")
    ):
        return Outcome(Phase.REJECTED, previous.message, config_map=outcome.config_map)
    return outcome


def newly_failed(previous: Condition | None, outcome: Outcome | None) -> bool:
    """A failure to announce (a Warning Event): Failed now, and not for the same Job before."""
    if outcome is None or outcome.phase is not Phase.FAILED:
        return False
    if previous is None or previous.reason != Phase.FAILED.value:
        return True
    return previous.message.split(" failed ", 1)[0] != outcome.message.split(" failed ", 1)[0]


def with_condition(
    status: DistServeDeploymentStatus, outcome: Outcome | None, now: str, generation: int | None
) -> DistServeDeploymentStatus:
    """Profiled from the profiling step's outcome; no Profiled where profiling does not apply."""
    if outcome is None:
        conds = [c for c in status.conditions if c.type != ConditionType.PROFILED]
    else:
        conds = conditions.set_condition(
            status.conditions,
            ConditionType.PROFILED,
            ConditionStatus.TRUE if outcome.succeeded else ConditionStatus.FALSE,
            outcome.phase.value,
            outcome.message,
            now=now,
            generation=generation,
        )
    return status.model_copy(update={"conditions": conds})
