"""Profiling Jobs against the API (spec.planner.profiling.mode Auto): find the stored profile, run,
watch and retry the Job, store its result. The decisions are profiling.py's; this is the I/O.

Called on every reconcile of a deployment that wants a profile (so the resync timer is the Job's
watch: no handler on Jobs, no extra watch stream). Never raises: a Job that cannot be created or
read is a Failed outcome with the reason, and the deployment plans on the analytical model.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import conditions, profiling
from . import labels as L
from .api import DistServeDeploymentSpec
from .kube import Kube
from .profiling import Outcome, Phase, ProfileKey
from .settings import OperatorSettings

if TYPE_CHECKING:
    from distserve_planner.profiles import Profile

JOB = ("batch/v1", "Job")
log = logging.getLogger(__name__)


def parse_profile(text: str, model: str, where: str) -> Profile:
    """A ConfigMap's profile.json as the planner's Profile, its source prefixed with `where` (the
    plan's status.plan.profile then names the ConfigMap). ValueError when it is not a profile."""
    from distserve_planner import profiles  # imported on first use, as the planner itself

    profile = profiles.parse(text, model)
    return profile.model_copy(update={"source": f"{where}: {profile.source}" if profile.source else where})


def _check(text: str, key: ProfileKey, where: str) -> Profile:
    from distserve_planner import profiles

    profile = parse_profile(text, key.model, where)
    if not profiles.matches_model(profile.model, key.model):
        raise ValueError(f"it is a profile of {profile.model}, not of {key.model}")
    return profile


async def _stored(kube: Kube, namespace: str, key: ProfileKey) -> dict[str, Any] | None:
    items = await kube.list_objects("v1", "ConfigMap", namespace, key.selector())
    mine = [cm for cm in items if key.matches(cm)]
    # The operator's own name first: a hand-made one with the same labels is the fallback.
    return next((cm for cm in mine if cm["metadata"]["name"] == key.config_map_name), None) or (
        mine[0] if mine else None
    )


async def stored_profile(kube: Kube, namespace: str, spec: DistServeDeploymentSpec) -> Profile | None:
    """The stored profile for this spec's model, GPU type and dtype, when auto profiling applies and
    one parses (a broken one is reported by `ensure` as Profiled=False; the plan stays analytical)."""
    if not profiling.wanted(spec):
        return None
    key = profiling.key_of(spec)
    cm = await _stored(kube, namespace, key)
    text = ((cm or {}).get("data") or {}).get(profiling.PROFILE_KEY_IN_CONFIGMAP)
    if cm is None or not text:
        return None
    try:
        return _check(text, key, f"ConfigMap {namespace}/{cm['metadata']['name']}")
    except ValueError:
        return None


async def ensure(
    kube: Kube, settings: OperatorSettings, namespace: str, spec: DistServeDeploymentSpec, now: datetime
) -> Outcome | None:
    """Bring profiling one step on; None when the spec does not want it."""
    if not profiling.wanted(spec):
        return None
    key = profiling.key_of(spec)
    try:
        return await _ensure(kube, settings, namespace, key, spec, now)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # RBAC, an API error: reported, never blocking the deployment
        log.warning(f"profiling {key.describe()}: {exc}")
        return Outcome(
            Phase.FAILED,
            f"cannot run the profiling Job for {key.describe()}: {exc}; fix: grant the operator get, list, "
            "create and delete on batch jobs (the chart does); planned on the analytical model meanwhile",
        )


async def _ensure(
    kube: Kube,
    settings: OperatorSettings,
    namespace: str,
    key: ProfileKey,
    spec: DistServeDeploymentSpec,
    now: datetime,
) -> Outcome:
    cm = await _stored(kube, namespace, key)
    if cm is not None:
        name = cm["metadata"]["name"]
        text = (cm.get("data") or {}).get(profiling.PROFILE_KEY_IN_CONFIGMAP) or ""
        try:
            _check(text, key, f"ConfigMap {namespace}/{name}")
        except ValueError as exc:
            return Outcome(
                Phase.FAILED,
                f"the stored profile ConfigMap {namespace}/{name} key {profiling.PROFILE_KEY_IN_CONFIGMAP} is "
                f"not a profile of {key.describe()} ({exc}); fix: delete it and the operator profiles again; "
                "planned on the analytical model meanwhile",
            )
        return Outcome(Phase.SUCCEEDED, f"profile of {key.describe()} in ConfigMap {name}", config_map=name)

    jobs = await kube.list_objects(*JOB, namespace, key.job_selector())
    job = profiling.latest(jobs)
    if job is None:
        return await _start(kube, settings, namespace, key, spec, 1, [], "")
    attempt = profiling.attempt_of(job)
    job_name = job["metadata"]["name"]
    pods = await kube.list_objects(
        "v1", "Pod", namespace, {**key.job_selector(), L.PROFILE_ATTEMPT: str(attempt)}
    )
    state = profiling.job_state(job, pods)
    meanwhile = "planned on the analytical model meanwhile"
    result = state.result
    if state.phase is Phase.SUCCEEDED and result is not None:
        where = f"ConfigMap {namespace}/{key.config_map_name}"
        try:
            _check(result, key, where)
        except ValueError as exc:
            state = profiling.JobState(
                Phase.FAILED, f"its termination message is not a profile ({exc})", finished=state.finished
            )
        else:
            cm = profiling.render_config_map(key, result, job_name)
            cm["metadata"]["namespace"] = namespace
            await kube.apply(cm)
            for old in jobs:  # stored: the Jobs (and their pods) are done
                await kube.delete(*JOB, namespace, old["metadata"]["name"])
            return Outcome(
                Phase.SUCCEEDED,
                f"profiling Job {job_name} measured {key.describe()}; stored in ConfigMap {key.config_map_name}",
                config_map=key.config_map_name,
            )
    if state.phase is Phase.FAILED:
        due = profiling.retry_due(
            state,
            attempt,
            base=settings.profile_backoff_seconds,
            cap=settings.profile_backoff_max_seconds,
            now=now,
        )
        failure = f"profiling Job {job_name} failed (attempt {attempt}): {state.message}"
        if due is None:
            return await _start(kube, settings, namespace, key, spec, attempt + 1, jobs, failure)
        return Outcome(
            Phase.FAILED,
            f"{failure}; attempt {attempt + 1} at {conditions.rfc3339(due)}; {meanwhile}",
        )
    why = f": {state.message}" if state.message else ""
    before = (job["metadata"].get("annotations") or {}).get(profiling.PREVIOUS_FAILURE)
    after = f" after {before}" if before else ""
    verb = "running" if state.phase is Phase.RUNNING else "pending"
    return Outcome(
        state.phase, f"profiling Job {job_name} {verb} (attempt {attempt}{why}){after}; {meanwhile}"
    )


async def _start(
    kube: Kube,
    settings: OperatorSettings,
    namespace: str,
    key: ProfileKey,
    spec: DistServeDeploymentSpec,
    attempt: int,
    older: list[dict[str, Any]],
    previous: str,
) -> Outcome:
    job = profiling.render_job(
        spec,
        key,
        attempt=attempt,
        deadline_seconds=settings.profile_job_deadline_seconds,
        previous_failure=previous,
    )
    job["metadata"]["namespace"] = namespace
    name = job["metadata"]["name"]
    # Deterministic names: the first deployment of this model to get here creates the Job, the
    # others find it and leave it as it is (Jobs are immutable; theirs may differ in image or
    # placement). Of two racing at once, the second's create finds the Job there (409).
    await kube.create(job, exist_ok=True)
    for old in older:  # the failed attempts: their message is in the new Job's annotation
        if old["metadata"]["name"] != name:
            await kube.delete(*JOB, namespace, old["metadata"]["name"])
    after = f" after {previous}" if previous else ""
    return Outcome(
        Phase.PENDING,
        f"profiling Job {name} created (attempt {attempt}){after}; planned on the analytical model meanwhile",
    )
