"""The operator's own settings: one typed object per process, validated once.

Each field reads `DISTSERVE_OPERATOR_<FIELD>` from the environment (what the Helm chart sets) and
can be overridden by a `distserve operator` flag of the same name. kopf's own flags
(`--namespace`, `--all-namespaces`, `--standalone`, `--liveness`, ...) pass through to `kopf run`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "DISTSERVE_OPERATOR_"
# Settings whose None is spelled with a word in the environment.
_NONE_WORDS = {"metrics_port": ("", "none", "off"), "planner_processes": ("", "none", "auto")}


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics_port: int | None = Field(
        9100,
        ge=0,
        le=65535,
        description="Port serving the operator's /metrics; 0 picks a free one, None disables.",
    )
    metrics_host: str = Field("0.0.0.0", description="Address the metrics server listens on.")
    planner_workers: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Threads running the CPU-bound planner off the event loop (a planner passed in by code, or "
            "plannerProcesses 0)."
        ),
    )
    planner_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description=(
            "Processes running the default planner, so that many deployments are planned on every core; "
            "None: one per usable CPU (affinity mask and cgroup CPU limit), at most 4, when there are two "
            "or more, threads otherwise; 0: threads only."
        ),
    )
    plan_cache_size: int = Field(
        256,
        ge=0,
        le=100_000,
        description=(
            "Plans kept by planning input (LRU): identical specs, overrides and profile are planned once. "
            "0 keeps none (identical plans in progress are still computed once)."
        ),
    )
    apply_concurrency: int = Field(
        4,
        ge=1,
        le=1000,
        description=(
            "Deployments whose children are applied at the same time. Each plan is recorded first, so "
            "when many deployments arrive at once they are all planned without waiting for the others' "
            "child writes, and the API server sees a bounded burst."
        ),
    )
    resync_seconds: float = Field(
        60.0,
        gt=0,
        description="How often every deployment is reconciled again to repair drift of its children.",
    )
    rollout_poll_seconds: float = Field(
        5.0,
        gt=0,
        description=(
            "While a staged rollout is in progress, how often its deployment is reconciled (each reconcile "
            "takes the next step once the new groups are Ready or the old ones drained)."
        ),
    )
    observe_tick_seconds: float = Field(
        1.0,
        gt=0,
        description=(
            "Granularity of the traffic observer; each deployment is observed every "
            "spec.autoscaling.intervalSeconds, checked at this granularity."
        ),
    )
    http_timeout_seconds: float = Field(
        10.0, gt=0, description="Timeout for metrics scrapes and Prometheus queries."
    )
    router_metrics_url: str = Field(
        "http://{name}.{namespace}.svc:{port}/metrics",
        description="Where the router's metrics are read (source Router); {name}, {namespace}, {port} are filled in.",
    )
    prometheus_selector: str = Field(
        'namespace="{namespace}",service="{name}"',
        description="PromQL label matchers selecting one deployment's router series (source Prometheus).",
    )
    field_manager: str = Field("distserve-operator", description="Field manager name on API writes.")
    api_server: str | None = Field(
        None,
        description=(
            "Kubernetes API URL to use instead of the in-cluster service account or kubeconfig "
            "(insecure, no auth: local development against an emulator)."
        ),
    )
    events: bool = Field(True, description="Post Kubernetes Events on plan and re-plan.")
    unschedulable_grace_seconds: float = Field(
        120.0,
        ge=0,
        description=(
            "How long worker pods may stay Pending for want of GPUs before the operator re-plans within "
            "the GPUs the cluster can allocate (a cluster autoscaler may add nodes meanwhile)."
        ),
    )
    gang_scheduling: bool = Field(
        False,
        description=(
            "Honour placement.gangScheduling: PodGroup: watch this operator's worker pods (server-side "
            "label selector) to join each to its instance's PodGroup. Needs RBAC on pods and "
            "scheduling.x-k8s.io podgroups (chart value podGroups.enabled=true sets both)."
        ),
    )
    profile_backoff_seconds: float = Field(
        300.0,
        gt=0,
        description=(
            "spec.planner.profiling Auto: after a failed profiling Job, how long until the next attempt; "
            "doubles with each failure of the same model, GPU type and dtype, up to profileBackoffMaxSeconds."
        ),
    )
    profile_backoff_max_seconds: float = Field(
        6 * 3600.0, gt=0, description="The cap on the wait between profiling attempts."
    )
    profile_job_deadline_seconds: int = Field(
        7200,
        ge=60,
        description=(
            "activeDeadlineSeconds of a profiling Job: waiting for a node, loading the model and measuring; "
            "past it the Job fails and is retried after the backoff."
        ),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> OperatorSettings:
        """Read `DISTSERVE_OPERATOR_*` variables, then apply explicit overrides (flags) on top."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = None if raw.lower() in _NONE_WORDS.get(name, ()) else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
