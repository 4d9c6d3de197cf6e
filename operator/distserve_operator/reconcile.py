"""The level-based reconcile and the traffic observer: orchestration of the pure modules.

`reconcile()` runs on create, update, resume and on a resync timer: validate the spec, plan when
the spec generation changed (or there is no plan yet), render and apply every child, prune what
is no longer rendered, and write status. `observe_once()` runs every `intervalSeconds` per
deployment: read traffic, compare it with the plan's assumptions, re-plan and scale if warranted.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import kopf
from pydantic import ValidationError

from . import (
    capacity,
    children,
    conditions,
    drift,
    observe,
    plan_cache,
    profile_jobs,
    profiling,
    rollout,
    scaling,
)
from . import labels as L
from .api import (
    AutoscalingMode,
    Condition,
    ConditionStatus,
    ConditionType,
    DistServeDeploymentSpec,
    DistServeDeploymentStatus,
    GangScheduling,
    GpuBudget,
    GpuType,
    MetricsSource,
    PlanStatus,
    Replan,
    Rollout,
    SpecError,
    WorkloadSnapshot,
    format_errors,
    parse_spec,
)
from .api.resource import name_problem
from .kube import Kube
from .metrics import OperatorMetrics
from .plan_pool import PlannerPool
from .settings import OperatorSettings

if TYPE_CHECKING:
    from distserve_planner.profiles import Profile

API_VERSION = "distserve.io/v1alpha1"
KIND = "DistServeDeployment"
log = logging.getLogger(__name__)
T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


class PlanReport(Protocol):
    @property
    def status(self) -> PlanStatus: ...


PlanFn = Callable[..., PlanReport]


def default_plan_fn() -> PlanFn:
    from distserve_planner import plan_deployment  # imported on first use: the planner is heavy-ish

    return plan_deployment


@dataclass
class Runtime:
    """Everything a handler needs, created at startup and kept in kopf's `memo`."""

    settings: OperatorSettings
    kube: Kube
    metrics: OperatorMetrics
    executor: ThreadPoolExecutor
    plan_fn: PlanFn
    plans: plan_cache.PlanCache[PlanStatus]
    # Deployments applying their children at once (settings.apply_concurrency). A plan is recorded
    # before its children are applied: with many new deployments, each is planned without
    # queueing behind the others' child writes, and the API server sees a bounded burst.
    apply_slots: asyncio.Semaphore
    pool: PlannerPool | None = None  # the default planner's processes; None: plan_fn in a thread


def _lock(memo: Any) -> asyncio.Lock:
    # kopf gives every object its own shallow copy of memo: a per-object lock serialises the
    # create/update handler, the resync timer and the observer daemon of one deployment.
    lock = memo.get("object_lock")
    if lock is None:
        lock = memo["object_lock"] = asyncio.Lock()
    return lock  # type: ignore[no-any-return]


def _now() -> datetime:
    return datetime.now(UTC)


def _status(raw: Any) -> DistServeDeploymentStatus:
    try:
        return DistServeDeploymentStatus.model_validate(raw or {})
    except ValidationError:
        # Foreign or older fields: keep what parses, start the rest afresh.
        keep = {k: v for k, v in (raw or {}).items() if k in ("conditions", "lastReplan")}
        try:
            return DistServeDeploymentStatus.model_validate(keep)
        except ValidationError:
            return DistServeDeploymentStatus()


async def _event(rt: Runtime, body: Any, type_: str, reason: str, message: str) -> None:
    if rt.settings.events:
        kopf.event(body, type=type_, reason=reason, message=message[:1000])


class ProfileConfigMapError(ValueError):
    """spec.planner.profileConfigMap's profile.json is there but is not a latency profile. The fix is
    an edit of the ConfigMap, not of the spec, so the resync retries it (it does not fail the
    generation the way a planner refusal does)."""


async def _configmap_profile(rt: Runtime, namespace: str, spec: DistServeDeploymentSpec) -> Profile | None:
    """spec.planner.profileConfigMap's `profile.json`, parsed into the planner's `Profile`; without
    one, the profile measured on the cluster (planner.profiling Auto) once stored. (A bundled
    spec.planner.profile the planner finds itself, in its package data.)"""
    name = spec.planner.profile_config_map
    if not name:
        return await profile_jobs.stored_profile(rt.kube, namespace, spec)
    cm = await rt.kube.get("v1", "ConfigMap", namespace, name)
    text = ((cm or {}).get("data") or {}).get("profile.json")
    if not text:
        raise kopf.TemporaryError(
            f"spec.planner.profileConfigMap: ConfigMap {namespace}/{name} with key profile.json not found; "
            "create it (distserve profile writes the file) or remove the field",
            delay=30,
        )
    where = f"ConfigMap {namespace}/{name}"
    try:
        return profile_jobs.parse_profile(text, spec.model.name, where)
    except ValueError as exc:
        detail = "; ".join(format_errors(exc, root="")) if isinstance(exc, ValidationError) else str(exc)
        raise ProfileConfigMapError(
            f"spec.planner.profileConfigMap: ConfigMap {namespace}/{name} key profile.json is not a latency "
            f"profile ({detail}); fix: put a file written by `distserve profile` there, or remove the field"
        ) from exc


async def _run_planner(
    rt: Runtime, spec: DistServeDeploymentSpec, reason: str, *, namespace: str, name: str, **kwargs: Any
) -> PlanStatus:
    profile = await _configmap_profile(rt, namespace, spec)
    if profile is not None:
        kwargs["profile"] = profile
    # Identical planning inputs (spec fields the planner reads, overrides, profile content) are
    # planned once, and once only while in progress: 100 identical deployments make one plan.
    status, lookup = await rt.plans.get(
        plan_cache.planning_key(spec, kwargs), lambda: _plan(rt, spec, kwargs)
    )
    rt.metrics.plan_cache_total.labels(result=lookup).inc()
    rt.metrics.replanned(namespace, name, reason)
    return status


async def _plan(rt: Runtime, spec: DistServeDeploymentSpec, kwargs: dict[str, Any]) -> PlanStatus:
    """One planner run: in the planner processes when there are (the default planner), else a thread."""
    started = time.perf_counter()
    try:
        if rt.pool is not None:
            return await rt.pool.plan(spec, kwargs)
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(rt.executor, functools.partial(rt.plan_fn, spec, **kwargs))
        return report.status
    finally:
        rt.metrics.plan_seconds.observe(time.perf_counter() - started)


async def _write_status(
    rt: Runtime, namespace: str, name: str, old_raw: Any, new: DistServeDeploymentStatus
) -> None:
    patch = conditions.merge_patch(old_raw or {}, new.to_wire())
    if patch:
        await rt.kube.patch_status(namespace, name, patch)


async def _fresh(rt: Runtime, namespace: str, name: str) -> dict[str, Any] | None:
    """The object as the API server has it now (kopf's body can lag our own status writes)."""
    return await rt.kube.get(API_VERSION, KIND, namespace, name)


# ---------------------------------------------------------------------------- reconcile


async def reconcile(
    rt: Runtime, body: Any, memo: Any, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    started = time.perf_counter()
    try:
        async with _lock(memo):
            await _reconcile_locked(rt, body, logger)
    finally:
        rt.metrics.reconcile_seconds.observe(time.perf_counter() - started)


async def _reconcile_locked(
    rt: Runtime, body: Any, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    live = await _fresh(rt, namespace, name)
    if live is None or live.get("metadata", {}).get("deletionTimestamp"):
        return  # deleted meanwhile: the garbage collector takes the children
    generation = live["metadata"].get("generation")
    old_raw = live.get("status") or {}
    status = _status(old_raw)
    now = conditions.rfc3339()

    try:
        spec = parse_spec(live.get("spec"))
        problem = name_problem(name)
        if problem:
            raise SpecError([problem])
    except SpecError as exc:
        await _not_planned(
            rt, live, status, "InvalidSpec", "invalid spec: " + "; ".join(exc.problems), now, logger
        )
        return  # nothing created, nothing retried: the user's next edit triggers us again

    spec, notices = effective_spec(rt.settings, spec)
    # planner.profiling Auto: the profiling Job's next step; Profiled says where it is.
    was_profiled = conditions.get_condition(status.conditions, ConditionType.PROFILED)
    profiled = profiling.keep_rejection(
        was_profiled, await profile_jobs.ensure(rt.kube, rt.settings, namespace, spec, _now())
    )
    status = profiling.with_condition(status, profiled, now, generation)
    if profiled is not None and profiling.newly_failed(was_profiled, profiled):
        await _event(rt, live, "Warning", "ProfilingFailed", profiled.message)
    plan = status.plan
    previous = plan
    first_plan = plan is None  # nothing of ours can exist yet: no need to look for stale children
    planned = conditions.get_condition(status.conditions, ConditionType.PLANNED)
    same_generation = status.observed_generation == generation
    if same_generation and planned is not None and planned.reason == "PlanFailed":
        return  # the planner refused this generation; it will not change its mind until the spec does
    pods = None if first_plan else await rt.kube.try_list("v1", "Pod", namespace, _worker_pods(name))
    waiting = _waiting(spec, name, pods)
    found: capacity.Allocatable | None = None
    if waiting.pods:
        found = await _allocatable(rt, spec, name, namespace)
    reason = ""
    if plan is None or not same_generation or planned is None or planned.status != T:
        reason = "Created" if plan is None else "SpecChanged"
    elif profiled and profiling.replan_with(profiled, plan.profile, namespace):
        reason = PROFILE_ARRIVED  # the measured profile is stored: plan with it
    elif _stuck_for_gpus(rt, plan, waiting, found):
        reason = "InsufficientGPUs"
    if reason:
        if found is None:
            found = await _allocatable(rt, spec, name, namespace)
        budget = capacity.budget(_nominal_gpus(spec), found, spec.cluster.gpu.resource_name)
        try:
            plan = await _run_planner(rt, _within(spec, budget), reason, namespace=namespace, name=name)
        except ProfileConfigMapError as exc:
            await _not_planned(rt, live, status, "ProfileInvalid", str(exc), now, logger)
            return  # not sticky: the resync reads the ConfigMap again
        except (SpecError, ValueError) as exc:
            if reason == PROFILE_ARRIVED and profiled is not None:
                # The measured profile gives no plan: the running plan stays (the next resync
                # converges on it, Profiled remembers the rejection); Planned is left alone.
                status = profiling.with_condition(
                    status, profiling.rejected(profiled, str(exc)), now, generation
                )
                await _write_status(rt, namespace, name, old_raw, status)
                return
            if budget.planned_within < budget.nominal:
                # Not the spec's fault: the cluster is full now. Not sticky: the resync retries.
                message = f"no plan fits the GPUs the cluster can allocate now ({budget.message}): {exc}"
                await _not_planned(rt, live, status, "InsufficientGPUs", message, now, logger)
                return
            message = f"the planner could not plan this spec: {exc}"
            await _not_planned(rt, live, status, "PlanFailed", message, now, logger)
            return
        except kopf.TemporaryError:
            raise
        except Exception as exc:
            raise kopf.TemporaryError(f"the planner failed unexpectedly: {exc!r}", delay=30) from exc
        if not plan.pinned:  # a pin's replicas are the user's (the planner checked its GPU budget)
            plan = drift.cap_replicas(
                plan, max_gpus=spec.autoscaling.max_gpus, min_replicas=spec.autoscaling.min_replicas
            )
        plan = plan.model_copy(update={"gpu_budget": budget})
        status = status.model_copy(
            update={
                "plan": plan,
                "rollout": _rollout_record(status, previous, plan, now),
                "assumptions": conditions.assumptions_from_spec(spec),
                "conditions": conditions.set_condition(
                    status.conditions,
                    ConditionType.PLANNED,
                    T,
                    "Planned" if reason == "Created" else "Replanned",
                    _planned_message(plan),
                    now=now,
                    generation=generation,
                ),
            }
        )
        verb = "Planned" if reason == "Created" else "Replanned"
        within = f"; {plan.gpu_budget.message}" if plan.gpu_budget and plan.gpu_budget.allocatable else ""
        await _event(
            rt,
            live,
            "Normal",
            verb,
            f"{plan.summary} ({plan.gpus} GPUs, {plan.estimated.goodput_per_gpu:.3g} req/s per GPU){within}",
        )
        logger.info(f"{verb}: {plan.summary}")
        # Record the plan before touching children: a failure below is repaired from status.
        planned_status = status.model_copy(update={"observed_generation": generation})
        await _write_status(rt, namespace, name, old_raw, planned_status)
        rt.metrics.plan_changed(namespace, name, reason)
        old_raw = planned_status.to_wire()

    assert plan is not None
    async with rt.apply_slots:  # the plan is recorded: its children wait for a slot (Runtime)
        converged = await _converge(
            rt, live, spec, plan, status, prune=not first_plan, now=now, logger=logger
        )
    status = converged.status
    if converged.waiting.pods and found is None:  # a pod went Pending since the first look
        found = await _allocatable(rt, spec, name, namespace)
    conds = _conditions(
        status, spec, plan, converged, now=now, generation=generation, notices=notices, found=found
    )
    if conditions.get_condition(conds, ConditionType.PLAN_DRIFT) is None:
        conds = conditions.set_condition(
            conds,
            ConditionType.PLAN_DRIFT,
            U,
            drift.Reason.NO_DATA,
            "no traffic observed yet",
            now=now,
            generation=generation,
        )
    new = status.model_copy(update={"observed_generation": generation, "conditions": conds})
    await _write_status(rt, namespace, name, old_raw, new)
    rt.metrics.record(namespace, name, spec.slo, new)
    await _finish(rt, live, converged, logger)


PROFILE_ARRIVED = "Profiled"


async def _not_planned(
    rt: Runtime,
    live: dict[str, Any],
    status: DistServeDeploymentStatus,
    reason: str,
    message: str,
    now: str,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    """Planned=False with the reason; a Warning Event only when the message is new (resyncs repeat it)."""
    meta = live["metadata"]
    generation = meta.get("generation")
    was = conditions.get_condition(status.conditions, ConditionType.PLANNED)
    conds = conditions.set_condition(
        status.conditions, ConditionType.PLANNED, F, reason, message, now=now, generation=generation
    )
    new = status.model_copy(update={"observed_generation": generation, "conditions": conds})
    await _write_status(rt, meta["namespace"], meta["name"], live.get("status") or {}, new)
    if was is None or was.reason != reason or was.message != message:
        logger.info(message)  # info: our own Event carries it (kopf posts warnings as Events too)
        await _event(rt, live, "Warning", reason, message)


def effective_spec(
    settings: OperatorSettings, spec: DistServeDeploymentSpec
) -> tuple[DistServeDeploymentSpec, list[tuple[str, str]]]:
    """The spec as this operator can honour it, and (reason, message) notices for what it cannot.

    Gang scheduling needs the operator's pod watch; without it, gated pods would wait forever, so
    they are scheduled without gangs and Degraded says why and how to enable it."""
    if spec.placement.gang_scheduling is GangScheduling.POD_GROUP and not settings.gang_scheduling:
        placement = spec.placement.model_copy(update={"gang_scheduling": GangScheduling.NONE})
        return spec.model_copy(update={"placement": placement}), [
            (
                "GangSchedulingUnavailable",
                "placement.gangScheduling is PodGroup but the operator runs without gang scheduling: "
                "install the chart with podGroups.enabled=true (or set DISTSERVE_OPERATOR_GANG_SCHEDULING=true "
                "and grant RBAC on pods and podgroups); pods are scheduled without gangs meanwhile",
            )
        ]
    return spec, []


# ---------------------------------------------------------------------------- children and rollout


async def _live_groups(rt: Runtime, name: str, namespace: str) -> list[rollout.Group]:
    """This deployment's worker StatefulSets, every revision, as they are now."""
    sets = await rt.kube.list_objects("apps/v1", "StatefulSet", namespace, L.owned_selector(name))
    return [rollout.group_of(s) for s in sets if (s.get("metadata", {}).get("labels") or {}).get(L.ROLE)]


def _worker_pods(name: str) -> dict[str, str]:
    return {**L.owned_selector(name), L.APP_COMPONENT: L.COMPONENT_WORKER}


def _waiting(spec: DistServeDeploymentSpec, name: str, pods: list[dict[str, Any]] | None) -> capacity.Waiting:
    return capacity.unschedulable(pods or [], instance=name, resource=spec.cluster.gpu.resource_name)


def _nominal_gpus(spec: DistServeDeploymentSpec) -> int:
    cap = spec.autoscaling.max_gpus
    return min(spec.cluster.gpu_budget, cap) if cap is not None else spec.cluster.gpu_budget


def _within(spec: DistServeDeploymentSpec, budget: GpuBudget) -> DistServeDeploymentSpec:
    """The spec the planner searches: the cluster capped at what is allocatable (pins excepted:
    a pin is the user's choice; Schedulable says when it does not fit)."""
    if budget.planned_within >= budget.nominal or spec.planner.pin is not None or budget.planned_within < 1:
        return spec
    cluster = spec.cluster.model_copy(update={"max_gpus": budget.planned_within})
    return spec.model_copy(update={"cluster": cluster})


async def _allocatable(
    rt: Runtime, spec: DistServeDeploymentSpec, name: str, namespace: str
) -> capacity.Allocatable | None:
    """What the cluster can give this deployment now; None on CPU clusters (nothing to count)."""
    if spec.cluster.gpu.type is GpuType.CPU:
        return None
    nodes = await rt.kube.try_list("v1", "Node", None, {})
    # Every pod on those nodes counts; a namespaced operator sees only its namespace's.
    pods = await rt.kube.try_list("v1", "Pod", None, {})
    if pods is None:
        pods = await rt.kube.try_list("v1", "Pod", namespace, {})
    quotas = await rt.kube.try_list("v1", "ResourceQuota", namespace, {})
    return capacity.allocatable(
        instance=name,
        resource=spec.cluster.gpu.resource_name,
        nodes=nodes or None,  # no node visible: unknown, not zero
        pods=pods,
        quotas=quotas,
        node_selector=spec.cluster.node_selector,
        tolerations=spec.cluster.tolerations,
    )


def _stuck_for_gpus(
    rt: Runtime, plan: PlanStatus, waiting: capacity.Waiting, found: capacity.Allocatable | None
) -> bool:
    """Pods have waited past the grace for GPUs the cluster does not have for this plan."""
    if not waiting.pods or plan.pinned or found is None or found.gpus is None or found.gpus >= plan.gpus:
        return False
    since = conditions.parse_time(waiting.oldest)
    return since is None or (_now() - since).total_seconds() >= rt.settings.unschedulable_grace_seconds


def _planned_message(plan: PlanStatus) -> str:
    text = plan.verdict or plan.summary
    if plan.gpu_budget is not None and plan.gpu_budget.planned_within < plan.gpu_budget.nominal:
        text = f"{text} ({plan.gpu_budget.message})"
    return text


def _rollout_record(
    status: DistServeDeploymentStatus, previous: PlanStatus | None, plan: PlanStatus, now: str
) -> Rollout | None:
    """Start a rollout record when the new plan's shape differs from the running one's."""
    if previous is None or children.revision(previous) == children.revision(plan):
        return status.rollout
    old = status.rollout
    if old is not None and old.new_revision != children.revision(plan):
        # Re-planned mid-rollout: every older revision goes the same way; keep the first start.
        return old.model_copy(update={"new_revision": children.revision(plan), "new_plan": plan.summary})
    return Rollout(
        old_revision=children.revision(previous),
        new_revision=children.revision(plan),
        old_plan=previous.summary,
        new_plan=plan.summary,
        started=now,
        step=rollout.StepName.STARTING_NEW,
    )


@dataclass
class Converged:
    """What one pass over the children found: status with roles and rollout, the rollout step."""

    status: DistServeDeploymentStatus
    step: rollout.Step
    waiting: capacity.Waiting
    finished_rollout: Rollout | None = None


async def _converge(
    rt: Runtime,
    owner: dict[str, Any],
    spec: DistServeDeploymentSpec,
    plan: PlanStatus,
    status: DistServeDeploymentStatus,
    *,
    prune: bool,
    now: str,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> Converged:
    """Apply every rendered child, take the next step of a staged rollout, prune what no revision
    needs any more; returns status with roles (the plan's revision) and the rollout."""
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    objs = children.render_all(name, spec, plan, namespace=namespace)
    ready: dict[str, int] = {}
    live_replicas: dict[str, int] = {}
    for obj in objs:
        kopf.adopt(obj, owner=owner)  # type: ignore[arg-type]  # a raw body works as the owner
        applied = await rt.kube.apply(
            obj,
            preserve_replicas=not children.scaled_by_operator(obj, spec.autoscaling.mode),
        )
        if obj["kind"] in ("StatefulSet", "Deployment"):
            ready[obj["metadata"]["name"]] = int((applied.obj.get("status") or {}).get("readyReplicas") or 0)
            live_replicas[obj["metadata"]["name"]] = int((applied.obj.get("spec") or {}).get("replicas") or 0)
    revision = children.revision(plan)
    groups = await _live_groups(rt, name, namespace) if prune else []
    pods = await rt.kube.try_list("v1", "Pod", namespace, _worker_pods(name)) if prune else None
    new_pods = [p for p in pods or [] if (p["metadata"].get("labels") or {}).get(L.REVISION) == revision]
    waiting_new = _waiting(spec, name, new_pods)
    step = rollout.step(groups, revision, drift.instances(plan), make_room=waiting_new.pods > 0)
    for sts, replicas in step.scale.items():
        logger.info(f"rollout: scaling {sts} of an old revision to {replicas}")
        await rt.kube.patch("apps/v1", "StatefulSet", namespace, sts, {"spec": {"replicas": replicas}})
    if prune:
        keep = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objs]
        kept = set(step.old_revisions) - set(step.remove)
        legacy_sets = {g.name for g in groups if g.revision == rollout.LEGACY}
        deleted = await rt.kube.prune(
            namespace,
            name,
            meta["uid"],
            keep,
            keep_if=lambda item: _kept_by_rollout(item, kept, legacy_sets),
            pod_groups=rt.settings.gang_scheduling,
        )
        if deleted:
            logger.info(f"pruned {', '.join(deleted)}")
    desired = children.role_replicas(name, spec, plan)
    if spec.autoscaling.mode is AutoscalingMode.EXTERNAL:
        # HPA/KEDA own the counts: report theirs, not the plan's.
        desired = {role: (obj, live_replicas.get(obj, n)) for role, (obj, n) in desired.items()}
    roles = conditions.roles_status(desired, ready)
    record = status.rollout
    finished = None
    if step.in_progress:
        base = record if record is not None and record.new_revision == revision else None
        record = Rollout(
            old_revision=",".join(r or "legacy" for r in step.old_revisions),
            new_revision=revision,
            old_plan=base.old_plan if base and base.old_plan else _describe_old(groups, revision),
            new_plan=plan.summary,
            started=base.started if base else now,
            step=step.step or "",
            roles=step.roles,
        )
    elif record is not None:
        finished, record = record, None
    return Converged(
        status.model_copy(update={"roles": roles, "rollout": record}),
        step,
        _waiting(spec, name, pods),
        finished,
    )


def _kept_by_rollout(item: dict[str, Any], revisions: set[str], legacy_sets: set[str]) -> bool:
    """Objects of an old revision still draining: its StatefulSets, their Services (DNS for the
    stages), its plan copy and PodGroups. Objects from before revisions have no label: their
    StatefulSets and the Services named like them."""
    meta = item.get("metadata") or {}
    labels = meta.get("labels") or {}
    if L.REVISION in labels:
        return labels[L.REVISION] in revisions
    if rollout.LEGACY not in revisions:
        return False
    return item.get("kind") in ("StatefulSet", "Service") and meta.get("name") in legacy_sets


def _describe_old(groups: list[rollout.Group], new_revision: str) -> str:
    old = [g for g in groups if g.revision != new_revision]
    return ", ".join(f"{g.name} ×{g.desired}" for g in sorted(old, key=lambda g: g.name))


def _conditions(
    status: DistServeDeploymentStatus,
    spec: DistServeDeploymentSpec,
    plan: PlanStatus,
    converged: Converged,
    *,
    now: str,
    generation: int | None,
    notices: list[tuple[str, str]],
    found: capacity.Allocatable | None,
) -> list[Condition]:
    conds = conditions.rollout_conditions(
        status.conditions,
        status.roles,
        plan,
        attainment_target=spec.slo.attainment_percent,
        observed=status.observed,
        now=now,
        generation=generation,
        notices=notices,
    )
    record = status.rollout
    if record is not None:
        conds = conditions.set_condition(
            conds,
            ConditionType.PROGRESSING,
            T,
            "StagedReplan",
            f"{record.old_plan} -> {record.new_plan}: {converged.step.message}",
            now=now,
            generation=generation,
        )
    return conditions.schedulable_condition(
        conds,
        converged.waiting,
        plan,
        allocatable=found.gpus if found is not None else None,
        where=found.describe(spec.cluster.gpu.resource_name) if found is not None else "",
        now=now,
        generation=generation,
    )


async def _finish(
    rt: Runtime,
    live: dict[str, Any],
    converged: Converged,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> None:
    if converged.finished_rollout is not None:
        r = converged.finished_rollout
        message = f"staged re-plan complete: {r.old_plan} -> {r.new_plan} (started {r.started})"
        logger.info(message)
        await _event(rt, live, "Normal", "RolloutComplete", message)


# ---------------------------------------------------------------------------- traffic


@dataclass
class Observer:
    """Per-deployment observer state (in the object's memo): the previous router scrape, when
    the next observation and rollout step are due."""

    last_scrape: observe.RouterScrape | None = None
    next_due: float = 0.0
    next_rollout_step: float = 0.0
    # The daemon's reading of spec.autoscaling (interval seconds, active) and its generation.
    observing: tuple[float, bool] = (60.0, False)
    spec_generation: int | None = None


def observer_state(memo: Any) -> Observer:
    state = memo.get("observer")
    if state is None:
        state = memo["observer"] = Observer()
    return state  # type: ignore[no-any-return]


async def read_traffic(
    rt: Runtime, spec: DistServeDeploymentSpec, name: str, namespace: str, state: Observer
) -> WorkloadSnapshot | None:
    metrics = spec.autoscaling.metrics
    timeout = rt.settings.http_timeout_seconds
    if metrics.source is MetricsSource.PROMETHEUS:
        base = (metrics.prometheus_url or "").rstrip("/")
        selector = rt.settings.prometheus_selector.format(name=name, namespace=namespace)
        values: dict[str, float | None] = {}
        for key, query in observe.prometheus_queries(selector, metrics.window_seconds).items():
            values[key] = observe.prometheus_scalar(
                await rt.kube.get_json(f"{base}/api/v1/query", {"query": query}, timeout)
            )
        return observe.workload_from_prometheus(values, metrics.window_seconds)
    url = rt.settings.router_metrics_url.format(name=name, namespace=namespace, port=spec.router.port)
    before = time.monotonic()
    text = await rt.kube.get_text(url, timeout)
    # The router counted at some moment during the request: the midpoint halves the timing error.
    scrape = observe.parse_router_metrics(text, (before + time.monotonic()) / 2)
    previous, state.last_scrape = state.last_scrape, scrape
    return None if previous is None else observe.workload_between(previous, scrape)


async def observe_once(
    rt: Runtime, body: Any, memo: Any, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    """One observation: status.observed, PlanDrift, and a re-plan when drift warrants it."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError:
        return
    if spec.autoscaling.mode is AutoscalingMode.OFF:
        return
    state = observer_state(memo)
    try:
        observed = await read_traffic(rt, spec, name, namespace, state)
    except Exception as exc:
        logger.debug(f"reading traffic failed: {exc!r}")
        return
    if observed is None:
        return
    async with _lock(memo):
        live = await _fresh(rt, namespace, name)
        if live is None or live["metadata"].get("deletionTimestamp"):
            return
        try:
            spec = parse_spec(live.get("spec"))
        except SpecError:
            return
        spec, notices = effective_spec(rt.settings, spec)
        await _on_observation(rt, live, spec, observed, logger, notices)


async def _on_observation(
    rt: Runtime,
    live: dict[str, Any],
    spec: DistServeDeploymentSpec,
    observed: WorkloadSnapshot,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    notices: list[tuple[str, str]],
) -> None:
    meta = live["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
    old_raw = live.get("status") or {}
    status = _status(old_raw)
    if status.plan is None:
        return  # not planned yet (or invalid): nothing to compare with
    now_dt = _now()
    now = conditions.rfc3339(now_dt)
    auto = spec.autoscaling
    plan = status.plan
    groups = await _live_groups(rt, name, namespace)
    revision = children.revision(plan)
    pending = scaling.not_ready(
        drift.instances(plan),
        {r: rollout.ready_instances(groups, revision, r) for r in rollout.ROLES},
    )
    last_change = conditions.parse_time(status.last_replan.time) if status.last_replan else None
    decision = scaling.consider(
        assumed=status.assumptions,
        observed=observed,
        auto=auto,
        attainment_target=spec.slo.attainment_percent,
        last_change=last_change,
        now=now_dt,
        rollout_in_progress=status.rollout is not None or bool(rollout.older(groups, revision)),
        pending=pending,
    )
    assessment = decision.assessment
    message = assessment.message + (f"; re-plan held: {decision.held}" if decision.held else "")
    conds = conditions.set_condition(
        status.conditions,
        ConditionType.PLAN_DRIFT,
        T if assessment.drifted else F,
        assessment.reason,
        message,
        now=now,
        generation=generation,
    )
    update: dict[str, Any] = {"observed": observed, "conditions": conds}
    found: capacity.Allocatable | None = None
    if decision.workload is not None:
        workload = decision.workload
        found = await _allocatable(rt, spec, name, namespace)
        budget = capacity.budget(_nominal_gpus(spec), found, spec.cluster.gpu.resource_name)
        proposed = await _run_planner(
            rt,
            _within(spec, budget),
            assessment.reason,
            namespace=namespace,
            name=name,
            workload_override=workload,
        )
        adoption = scaling.adopt(
            plan,
            proposed.model_copy(update={"gpu_budget": budget}),
            auto=auto,
            workload=workload,
            pending=pending,
            parallelism_hash=children.parallelism_hash,
        )
        if adoption.plan is not None:
            update["assumptions"] = workload  # re-centre the tolerance band on what we now plan for
            message = f"{assessment.message}: {adoption.message}"
            update["plan"] = adoption.plan
            update["rollout"] = _rollout_record(status, plan, adoption.plan, now)
            update["last_replan"] = Replan(time=now, reason=f"{assessment.reason}: {assessment.message}")
            update["conditions"] = conditions.set_condition(
                conds, ConditionType.PLAN_DRIFT, F, "Replanned", message, now=now, generation=generation
            )
            logger.info(f"Re-planned: {message}")
            await _event(rt, live, "Normal", "Replanned", message)
            plan = adoption.plan
        elif not adoption.message.startswith("scale-down"):
            # The plan for what is observed is the running one: re-centre the band on it.
            update["assumptions"] = workload
            update["conditions"] = conditions.set_condition(
                conds,
                ConditionType.PLAN_DRIFT,
                F,
                "WithinPlan",
                f"{assessment.message}: {adoption.message}",
                now=now,
                generation=generation,
            )
        else:
            update["conditions"] = conditions.set_condition(
                conds,
                ConditionType.PLAN_DRIFT,
                T,
                assessment.reason,
                f"{assessment.message}; re-plan held: {adoption.message}",
                now=now,
                generation=generation,
            )
    new = status.model_copy(update=update)
    await _write_status(rt, namespace, name, old_raw, new)
    rt.metrics.record(namespace, name, spec.slo, new)
    if "plan" in update:
        rt.metrics.plan_changed(namespace, name, assessment.reason)
        # The plan is recorded first: if applying fails now, the resync applies it from status.
        async with rt.apply_slots:
            converged = await _converge(rt, live, spec, plan, new, prune=True, now=now, logger=logger)
        if converged.waiting.pods and found is None:
            found = await _allocatable(rt, spec, name, namespace)
        final = converged.status.model_copy(
            update={
                "conditions": _conditions(
                    converged.status,
                    spec,
                    plan,
                    converged,
                    now=now,
                    generation=generation,
                    notices=notices,
                    found=found,
                )
            }
        )
        await _write_status(rt, namespace, name, new.to_wire(), final)
        rt.metrics.record(namespace, name, spec.slo, final)
        await _finish(rt, live, converged, logger)


# ---------------------------------------------------------------------------- gang scheduling


async def ungate_pod(rt: Runtime, pod: Any) -> None:
    """Label a gated worker pod with its instance's PodGroup (by ordinal) and lift our gate."""
    patch = children.ungate_patch(pod)
    if patch is not None:
        meta = pod["metadata"]
        await rt.kube.patch("v1", "Pod", meta["namespace"], meta["name"], patch)
