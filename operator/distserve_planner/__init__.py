"""The planner: choose prefill/decode parallelism and replicas that maximise goodput per GPU under
TTFT/TPOT SLOs (DistServe, arXiv 2401.09670). Pure Python: no kopf, kubernetes or torch imports.

    report = plan_deployment(dsd_or_spec, profile=None, trace=None)
    report.plan.prefill.replicas, report.to_json(), report.table()

`plan(PlanInput)` is the pure core; `plan_deployment` adapts a manifest to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from distserve_operator import api

from .core import PlanInput, WorkloadModel, plan
from .profiles import Profile
from .report import PlanReport


def plan_deployment(
    dsd_or_spec: api.DistServeDeployment | api.DistServeDeploymentSpec,
    *,
    profile: Profile | str | Path | None = None,
    trace: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    rate_override: float | None = None,
    workload_override: api.WorkloadSnapshot | None = None,
    colocated_profile: Profile | str | Path | None = None,
) -> PlanReport:
    """Plan a deployment. `profile` is a parsed `Profile`, a profile file or a bundled profile's name
    and replaces spec.planner.profile; with neither the latency model is analytical. ValueError
    names the spec field and the fix when it cannot be planned (unknown architecture, unreadable
    profile or trace, a profile of another model); an SLO no candidate meets is not an error: the
    report has `feasible: false` and the closest candidate."""
    from .loaders.spec import plan_input

    spec = dsd_or_spec.spec if isinstance(dsd_or_spec, api.DistServeDeployment) else dsd_or_spec
    inp = plan_input(
        spec,
        profile=profile,
        trace=trace,
        rate_override=rate_override,
        workload_override=workload_override,
        colocated_profile=colocated_profile,
    )
    return plan(inp, progress=progress)


def engine_limits(spec: api.DistServeDeploymentSpec, decode_tp: int, decode_pp: int) -> api.EngineLimits:
    """The engine limits a plan with this decode shape is simulated with: spec.engine's token
    budget and batch limit (the device's default batch when unset) and the decode memory fit's KV
    capacity. A report carries them (`PlanStatus.limits`); this recomputes them for a plan that was
    recorded without them."""
    from distserve_operator.api.limits import MIN_DECODE_KV_TOKENS

    from .hardware import from_gpu_spec
    from .loaders.architecture import resolve
    from .memory import check_fit

    device = from_gpu_spec(spec.cluster.gpu)
    fit = check_fit(resolve(spec.model), device, decode_tp, decode_pp)
    return api.EngineLimits(
        prefill_token_budget=spec.engine.prefill_token_budget,
        decode_max_batch=spec.engine.decode_max_batch or device.decode_max_batch,
        decode_kv_tokens=max(MIN_DECODE_KV_TOKENS, fit.kv_tokens),
    )


__all__ = ["PlanInput", "PlanReport", "Profile", "WorkloadModel", "engine_limits", "plan", "plan_deployment"]
