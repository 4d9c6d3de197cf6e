"""kopf handlers: thin wrappers that hand over to `reconcile` (stable ids: kopf stores progress by them).

Nothing registers at import: `register(registry, settings)` attaches the handlers to a registry,
so the CLI, the tests and the benchmark each build their own operator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from . import labels as L
from . import reconcile as R
from .api import GROUP, PLURAL, VERSION, AutoscalingMode, SpecError, parse_spec
from .kube import Kube
from .metrics import OperatorMetrics
from .plan_cache import PlanCache
from .plan_pool import PlannerPool, processes_for
from .settings import OperatorSettings

Logger = logging.Logger | logging.LoggerAdapter[Any]
WORKER_POD_LABELS = {L.APP_MANAGED_BY: L.MANAGER_VALUE, L.APP_COMPONENT: L.COMPONENT_WORKER}


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """kopf's bookkeeping in annotations only: `status` holds nothing but our schema."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=L.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=L.KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{L.KOPF_PREFIX}/finalizer"
    # Our own Events say what happened; kopf's "Handler succeeded" Events would drown them.
    settings.posting.level = logging.WARNING
    # Timers (the resync) have no cancellation timeout: check often whether they finished.
    settings.background.cancellation_polling = 1.0
    # Pods are watched (gang scheduling only) through a server-side selector: never the whole cluster's.
    settings.watching.label_selectors["v1", "pods"] = ",".join(
        f"{k}={v}" for k, v in WORKER_POD_LABELS.items()
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def _planner_pool(settings: OperatorSettings) -> PlannerPool | None:
    processes = processes_for(settings.planner_processes)
    return PlannerPool(processes) if processes > 0 else None


def _observing(body: kopf.Body, state: R.Observer) -> tuple[float, bool]:
    """spec.autoscaling's interval and whether traffic is observed, parsed once per generation."""
    generation = (body.get("metadata") or {}).get("generation")
    if generation is None or state.spec_generation != generation:
        try:
            spec = parse_spec(body.get("spec"))
            state.observing = (
                float(spec.autoscaling.interval_seconds),
                spec.autoscaling.mode is not AutoscalingMode.OFF,
            )
        except SpecError:
            state.observing = (60.0, False)
        state.spec_generation = generation
    return state.observing


def register(
    registry: kopf.OperatorRegistry,
    settings: OperatorSettings,
    *,
    plan_fn: R.PlanFn | None = None,
) -> kopf.OperatorRegistry:
    """Attach every handler to `registry`. `plan_fn` defaults to the real planner."""
    op_settings = settings  # handlers receive kopf's own `settings` kwarg; keep ours apart
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
        configure_kopf(settings)
        metrics = OperatorMetrics()
        runtime = R.Runtime(
            settings=op_settings,
            kube=Kube(
                field_manager=op_settings.field_manager,
                api_server=op_settings.api_server,
                threads=max(4, op_settings.apply_concurrency),
            ),
            metrics=metrics,
            executor=ThreadPoolExecutor(
                max_workers=op_settings.planner_workers, thread_name_prefix="planner"
            ),
            plan_fn=plan_fn or R.default_plan_fn(),
            plans=PlanCache(op_settings.plan_cache_size),
            apply_slots=asyncio.Semaphore(op_settings.apply_concurrency),
            pool=_planner_pool(op_settings) if plan_fn is None else None,
        )
        memo["runtime"] = runtime
        if runtime.pool is not None:
            # Before kopf lists anything: the processes import the planner now, not at the first plan.
            try:
                await runtime.pool.start()
                logger.info(f"Planning in {runtime.pool.processes} processes")
            except Exception as exc:  # not fatal: a pool that broke is replaced at the first plan
                logger.warning(f"planner processes did not start: {exc!r}")
        if op_settings.metrics_port is not None:
            port = await metrics.start(op_settings.metrics_host, op_settings.metrics_port)
            logger.info(f"Operator metrics on :{port}/metrics")

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(memo: Any, **_: Any) -> None:
        runtime: R.Runtime | None = memo.get("runtime")
        if runtime is not None:
            await runtime.metrics.stop()
            await runtime.kube.close_all()
            runtime.executor.shutdown(wait=False, cancel_futures=True)
            if runtime.pool is not None:
                runtime.pool.shutdown()

    @kopf.on.login(registry=registry, id="login")
    def login(memo: Any, logger: Logger, **kwargs: Any) -> kopf.ConnectionInfo | None:
        if op_settings.api_server:
            info: kopf.ConnectionInfo | None = kopf.ConnectionInfo(
                server=op_settings.api_server, insecure=True
            )
        elif kopf.login_with_service_account(**kwargs) is not None:
            info = kopf.login_with_service_account(**kwargs)
        else:
            info = kopf.login_with_kubeconfig(**kwargs)
        return info

    async def on_change(body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
        await R.reconcile(memo["runtime"], body, memo, logger)

    for cause, handler_id in (
        (kopf.on.create, "reconcile-create"),
        (kopf.on.update, "reconcile-update"),
        (kopf.on.resume, "reconcile-resume"),
    ):
        cause(*resource, id=handler_id, registry=registry)(on_change)

    # Level-based repair: children edited or deleted by hand come back, readiness is refreshed.
    kopf.timer(
        *resource,
        id="resync",
        interval=op_settings.resync_seconds,
        initial_delay=op_settings.resync_seconds,
        idle=None,
        registry=registry,
    )(on_change)

    if op_settings.gang_scheduling:
        # Gang scheduling: a worker pod starts gated; join it to its instance's PodGroup, then ungate.
        # Only registered when enabled: otherwise the operator neither watches nor may read pods.
        @kopf.on.event(
            "v1",
            "pods",
            id="gang-ungate",
            registry=registry,
            labels=WORKER_POD_LABELS,
        )
        async def gang_ungate(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
            if type == "DELETED" or "runtime" not in memo:
                return
            await R.ungate_pod(memo["runtime"], body)

    @kopf.daemon(
        *resource, id="observe-traffic", registry=registry, cancellation_backoff=2.0, cancellation_timeout=5.0
    )
    async def observe_traffic(body: kopf.Body, memo: Any, logger: Logger, stopped: Any, **_: Any) -> None:
        runtime: R.Runtime = memo["runtime"]
        state = R.observer_state(memo)
        try:
            while not stopped:
                interval, active = _observing(body, state)
                rolling = bool((body.get("status") or {}).get("rollout"))
                now = time.monotonic()
                if rolling and now >= state.next_rollout_step:
                    # A staged rollout moves on readiness, which no event of ours announces: look often.
                    state.next_rollout_step = now + op_settings.rollout_poll_seconds
                    try:
                        await R.reconcile(runtime, body, memo, logger)
                    except kopf.TemporaryError as exc:
                        logger.warning(f"rollout step deferred: {exc}")
                if active and now >= state.next_due:
                    state.next_due = now + interval
                    try:
                        await R.observe_once(runtime, body, memo, logger)
                    except kopf.TemporaryError as exc:
                        logger.warning(f"traffic observation deferred: {exc}")
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # One bad interval (a planner error on odd traffic) must not end observation.
                        logger.exception("traffic observation failed; retrying next interval")
                # Wake for what is due (at most a tick away, so a new rollout or mode is seen), never
                # sooner than needed: one daemon per deployment, hundreds of them share the event loop.
                due = [t for t, on in ((state.next_due, active), (state.next_rollout_step, rolling)) if on]
                wait = min([op_settings.observe_tick_seconds, *(t - time.monotonic() for t in due)])
                # A plain sleep, not `stopped.wait(timeout)`: on Python 3.11 a cancellation racing that
                # timeout surfaces as TimeoutError and kopf reports the daemon as failed.
                await asyncio.sleep(max(0.05, wait))
        finally:
            # The daemon ends when the deployment is deleted (or the operator stops): its gauges go.
            meta = body.get("metadata") or {}
            runtime.metrics.forget(meta.get("namespace", ""), meta.get("name", ""))

    return registry
