"""The level-based reconcile and the traffic observer: orchestration of the pure modules.

`reconcile()` runs on create, update, resume and on a resync timer: validate the spec, plan when
the spec generation changed (or there is no plan yet), render and apply every child, prune what
is no longer rendered, and write status. `observe_once()` runs every `intervalSeconds` per
deployment: read traffic, compare it with the plan's assumptions, re-plan and scale if warranted.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import kopf
from pydantic import ValidationError

from . import children, conditions, drift, observe
from .api import (
    AutoscalingMode,
    ConditionStatus,
    ConditionType,
    DistServeDeploymentSpec,
    DistServeDeploymentStatus,
    GangScheduling,
    MetricsSource,
    PlanStatus,
    Replan,
    ReplanScope,
    RoleStatus,
    SpecError,
    WorkloadSnapshot,
    parse_spec,
)
from .kube import Kube
from .metrics import OperatorMetrics
from .settings import OperatorSettings

API_VERSION = "distserve.io/v1alpha1"
KIND = "DistServeDeployment"
log = logging.getLogger(__name__)
T, F, U = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN


class PlanReport(Protocol):
    @property
    def status(self) -> PlanStatus: ...


PlanFn = Callable[..., PlanReport]


def default_plan_fn() -> PlanFn:
    from .planner import plan_deployment  # imported on first use: the planner is heavy-ish

    return plan_deployment


@dataclass
class Runtime:
    """Everything a handler needs, created at startup and kept in kopf's `memo`."""

    settings: OperatorSettings
    kube: Kube
    metrics: OperatorMetrics
    executor: ThreadPoolExecutor
    plan_fn: PlanFn


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


async def _profile_path(rt: Runtime, namespace: str, spec: DistServeDeploymentSpec) -> str | None:
    """spec.planner.profileConfigMap's `profile.json`, written to a file for the planner."""
    name = spec.planner.profile_config_map
    if not name:
        return None
    cm = await rt.kube.get("v1", "ConfigMap", namespace, name)
    text = ((cm or {}).get("data") or {}).get("profile.json")
    if not text:
        raise kopf.TemporaryError(
            f"spec.planner.profileConfigMap: ConfigMap {namespace}/{name} with key profile.json not found; "
            "create it (distserve profile writes the file) or remove the field",
            delay=30,
        )
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"distserve-profile-{digest}.json"
    if not path.exists():
        path.write_text(text)
    return str(path)


async def _run_planner(
    rt: Runtime, spec: DistServeDeploymentSpec, reason: str, *, namespace: str, **kwargs: Any
) -> PlanStatus:
    profile = await _profile_path(rt, namespace, spec)
    if profile is not None:
        kwargs["profile"] = profile
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    try:
        report = await loop.run_in_executor(rt.executor, functools.partial(rt.plan_fn, spec, **kwargs))
    finally:
        rt.metrics.plan_seconds.observe(time.perf_counter() - started)
    rt.metrics.replans_total.labels(reason=reason).inc()
    return report.status


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
    except SpecError as exc:
        await _not_planned(
            rt, live, status, "InvalidSpec", "invalid spec: " + "; ".join(exc.problems), now, logger
        )
        return  # nothing created, nothing retried: the user's next edit triggers us again

    spec, notices = effective_spec(rt.settings, spec)
    plan = status.plan
    first_plan = plan is None  # nothing of ours can exist yet: no need to look for stale children
    planned = conditions.get_condition(status.conditions, ConditionType.PLANNED)
    same_generation = status.observed_generation == generation
    if same_generation and planned is not None and planned.reason == "PlanFailed":
        return  # the planner refused this generation; it will not change its mind until the spec does
    if plan is None or not same_generation or planned is None or planned.status != T:
        reason = "Created" if plan is None else "SpecChanged"
        try:
            plan = await _run_planner(rt, spec, reason, namespace=namespace)
        except (SpecError, ValueError) as exc:
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
        status = status.model_copy(
            update={
                "plan": plan,
                "assumptions": conditions.assumptions_from_spec(spec),
                "conditions": conditions.set_condition(
                    status.conditions,
                    ConditionType.PLANNED,
                    T,
                    "Planned" if reason == "Created" else "Replanned",
                    plan.verdict or plan.summary,
                    now=now,
                    generation=generation,
                ),
            }
        )
        verb = "Planned" if reason == "Created" else "Replanned"
        await _event(
            rt,
            live,
            "Normal",
            verb,
            f"{plan.summary} ({plan.gpus} GPUs, {plan.estimated.goodput_per_gpu:.3g} req/s per GPU)",
        )
        logger.info(f"{verb}: {plan.summary}")
        # Record the plan before touching children: a failure below is repaired from status.
        planned_status = status.model_copy(update={"observed_generation": generation})
        await _write_status(rt, namespace, name, old_raw, planned_status)
        old_raw = planned_status.to_wire()

    roles = await _apply_children(rt, live, spec, plan, prune=not first_plan)
    conds = conditions.rollout_conditions(
        status.conditions,
        roles,
        plan,
        attainment_target=spec.slo.attainment_percent,
        observed=status.observed,
        now=now,
        generation=generation,
        notices=notices,
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
    new = status.model_copy(update={"observed_generation": generation, "roles": roles, "conditions": conds})
    await _write_status(rt, namespace, name, old_raw, new)


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


async def _replace_if_rebound(rt: Runtime, obj: dict[str, Any]) -> None:
    """A StatefulSet's `serviceName` cannot be changed in place (the API server refuses the
    patch): delete one governed by another Service (one from before per-stage Services) so it is
    created anew, its pods with it, and they get their stage DNS names."""
    meta = obj["metadata"]
    live = await rt.kube.get(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
    live_service = ((live or {}).get("spec") or {}).get("serviceName")
    if live_service and live_service != obj["spec"]["serviceName"]:
        log.info(
            "StatefulSet %s: serviceName %s -> %s cannot change in place; recreating it",
            meta["name"],
            live_service,
            obj["spec"]["serviceName"],
        )
        await rt.kube.delete(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])


async def _apply_children(
    rt: Runtime, owner: dict[str, Any], spec: DistServeDeploymentSpec, plan: PlanStatus, *, prune: bool = True
) -> list[RoleStatus]:
    """Apply every rendered child (and delete stale ones when `prune`); returns replicas and ready
    replicas per role."""
    meta = owner["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    objs = children.render_all(name, spec, plan, namespace=namespace)
    ready: dict[str, int] = {}
    live_replicas: dict[str, int] = {}
    for obj in objs:
        kopf.adopt(obj, owner=owner)  # type: ignore[arg-type]  # a raw body works as the owner
        if obj["kind"] == "StatefulSet":
            await _replace_if_rebound(rt, obj)
        applied = await rt.kube.apply(
            obj, preserve_replicas=not children.scaled_by_operator(obj, spec.autoscaling.mode)
        )
        if obj["kind"] in ("StatefulSet", "Deployment"):
            ready[obj["metadata"]["name"]] = int((applied.obj.get("status") or {}).get("readyReplicas") or 0)
            live_replicas[obj["metadata"]["name"]] = int((applied.obj.get("spec") or {}).get("replicas") or 0)
    keep = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objs]
    if prune:
        await rt.kube.prune(namespace, name, meta["uid"], keep)
    desired = children.role_replicas(name, spec, plan)
    if spec.autoscaling.mode is AutoscalingMode.EXTERNAL:
        # HPA/KEDA own the counts: report theirs, not the plan's.
        desired = {role: (obj, live_replicas.get(obj, n)) for role, (obj, n) in desired.items()}
    return conditions.roles_status(desired, ready)


# ---------------------------------------------------------------------------- traffic


@dataclass
class Observer:
    """Per-deployment observer state (in the object's memo): the previous router scrape."""

    last_scrape: observe.RouterScrape | None = None
    next_due: float = 0.0


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
    assessment = drift.assess(
        status.assumptions,
        observed,
        drift_percent=auto.drift_percent,
        attainment_target=spec.slo.attainment_percent,
    )
    conds = conditions.set_condition(
        status.conditions,
        ConditionType.PLAN_DRIFT,
        T if assessment.drifted else F,
        assessment.reason,
        assessment.message,
        now=now,
        generation=generation,
    )
    update: dict[str, Any] = {"observed": observed, "conditions": conds}
    plan = status.plan
    last_change = conditions.parse_time(status.last_replan.time) if status.last_replan else None
    if (
        assessment.drifted
        and status.assumptions is not None
        and drift.may_scale(auto.mode)
        and not drift.in_cooldown(last_change, now_dt, auto.cooldown_seconds)
    ):
        workload = drift.replan_workload(status.assumptions, observed, assessment)
        proposed = await _run_planner(
            rt, spec, assessment.reason, namespace=namespace, workload_override=workload
        )
        if auto.scope is ReplanScope.REPLICAS:
            proposed = drift.keep_parallelism(plan, proposed, workload.requests_per_second)
        if not proposed.pinned:
            proposed = drift.cap_replicas(proposed, max_gpus=auto.max_gpus, min_replicas=auto.min_replicas)
        proposed = proposed.model_copy(update={"summary": drift.summary(proposed)})
        update["assumptions"] = workload  # re-centre the tolerance band on what we now plan for
        changed = drift.replicas_changed(plan, proposed) or children.parallelism_hash(
            plan
        ) != children.parallelism_hash(proposed)
        if changed:
            message = f"{assessment.message}: {drift.summary(plan)} -> {drift.summary(proposed)}"
            update["plan"] = proposed
            update["last_replan"] = Replan(time=now, reason=f"{assessment.reason}: {assessment.message}")
            update["conditions"] = conditions.set_condition(
                conds, ConditionType.PLAN_DRIFT, F, "Replanned", message, now=now, generation=generation
            )
            logger.info(f"Re-planned: {message}")
            await _event(rt, live, "Normal", "Replanned", message)
            plan = proposed
    new = status.model_copy(update=update)
    await _write_status(rt, namespace, name, old_raw, new)
    if "plan" in update:
        # The plan is recorded first: if applying fails now, the resync applies it from status.
        roles = await _apply_children(rt, live, spec, plan)
        final = new.model_copy(
            update={
                "roles": roles,
                "conditions": conditions.rollout_conditions(
                    new.conditions,
                    roles,
                    plan,
                    attainment_target=spec.slo.attainment_percent,
                    observed=observed,
                    now=now,
                    generation=generation,
                    notices=notices,
                ),
            }
        )
        await _write_status(rt, namespace, name, new.to_wire(), final)


# ---------------------------------------------------------------------------- gang scheduling


async def ungate_pod(rt: Runtime, pod: Any) -> None:
    """Label a gated worker pod with its instance's PodGroup (by ordinal) and lift our gate."""
    patch = children.ungate_patch(pod)
    if patch is not None:
        meta = pod["metadata"]
        await rt.kube.patch("v1", "Pod", meta["namespace"], meta["name"], patch)
