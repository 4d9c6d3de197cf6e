"""From a `DistServeDeploymentSpec` (plus CLI/operator overrides) to the pure core's `PlanInput`."""

from __future__ import annotations

from pathlib import Path

from distserve_operator import api

from .. import hardware, latency, profiles
from ..architecture import ModelArchitecture
from ..core import PlanInput, WorkloadModel
from ..pin import PhaseChoice, Pin
from ..search import ClusterShape, SloTargets
from ..workload import Lengths
from . import architecture, bundled, profile_files
from .traces import read_trace

ProfileArg = profiles.Profile | str | Path | None


def resolve_profile(
    spec: api.DistServeDeploymentSpec, profile: ProfileArg, flag: str = "--profile"
) -> tuple[profiles.Profile | None, str]:
    """The profile to plan with and how to name it: the caller's (a parsed `Profile`, a file, or a
    bundled name), else spec.planner.profile's bundled one; (None, "") for the analytical model."""
    if isinstance(profile, profiles.Profile):
        return profile, ""
    if profile is not None:
        path = Path(profile)
        if not path.is_file() and str(profile) in bundled.names():
            return bundled.load(str(profile), spec.model.name, flag), f"bundled profile {profile}"
        if not path.exists():
            raise ValueError(
                f"{flag} {profile}: no such file, nor a bundled profile (bundled: {', '.join(bundled.names())})"
            )
        return profile_files.load(path, spec.model.name), ""
    if spec.planner.profile is not None:
        name = spec.planner.profile.value
        return bundled.load(name, spec.model.name), f"bundled profile {name}"
    return None, ""


def latency_model_for(
    spec: api.DistServeDeploymentSpec,
    arch: ModelArchitecture,
    device: hardware.DeviceSpec,
    links: hardware.Links,
    profile: ProfileArg,
) -> tuple[latency.LatencyModel, str]:
    """The latency model and where it comes from (the plan's `latencySource` assumption)."""
    chosen, label = resolve_profile(spec, profile)
    if chosen is None:
        return latency.analytical(arch, device, links.intra_node), "analytical"
    source = label or ("profile" if isinstance(profile, profiles.Profile) else "profile file")
    return profiles.latency_model(chosen, label), source


def plan_input(
    spec: api.DistServeDeploymentSpec,
    *,
    profile: ProfileArg = None,
    trace: str | Path | None = None,
    rate_override: float | None = None,
    workload_override: api.WorkloadSnapshot | None = None,
    colocated_profile: ProfileArg = None,
) -> PlanInput:
    """ValueError (naming the field and the fix) when the spec cannot be planned. `profile` (a
    parsed `Profile`, a file or a bundled name) overrides spec.planner.profile; neither: analytical."""
    arch = architecture.resolve(spec.model)
    device = hardware.from_gpu_spec(spec.cluster.gpu)
    links = hardware.Links.from_spec(spec.cluster.interconnect)
    w = spec.workload
    inputs, outputs = Lengths.from_spec(w.input_tokens), Lengths.from_spec(w.output_tokens)
    rate = w.requests_per_second
    if workload_override is not None:
        rate = workload_override.requests_per_second
        if workload_override.input_tokens_mean:
            inputs = Lengths.observed(workload_override.input_tokens_mean, workload_override.input_tokens_p90)
        if workload_override.output_tokens_mean:
            outputs = Lengths.observed(
                workload_override.output_tokens_mean, workload_override.output_tokens_p90
            )
    if rate_override is not None:
        rate = rate_override
    rows = tuple(read_trace(trace)) if trace else None
    model, latency_source = latency_model_for(spec, arch, device, links, profile)
    assumptions: dict[str, object] = {"latencySource": latency_source}
    if spec.planner.profile_config_map and profile is None:
        assumptions["profileConfigMap"] = (
            f"{spec.planner.profile_config_map} (not read offline: pass its profile.json with --profile)"
        )
    if spec.planner.profile is not None and profile is not None:
        assumptions["profile"] = f"{spec.planner.profile.value} (not used: the profile passed in replaces it)"
    if trace:
        assumptions["trace"] = str(trace)
    coloc_model = None
    if colocated_profile is not None:
        coloc, coloc_label = resolve_profile(spec, colocated_profile, "--colocated-profile")
        assert coloc is not None  # a profile was passed
        coloc_model = profiles.latency_model(coloc, coloc_label)
        assumptions["colocatedLatency"] = coloc_model.describe
    cluster = spec.cluster
    return PlanInput(
        architecture=arch,
        device=device,
        links=links,
        latency=model,
        slo=SloTargets(spec.slo.ttft_millis, spec.slo.tpot_millis, spec.slo.attainment_percent / 100),
        workload=WorkloadModel(rate, inputs, outputs, w.arrival, w.burstiness_percent / 100, rows),
        cluster=ClusterShape(cluster.gpus_per_node, cluster.nodes, cluster.gpu_budget),
        affinity=spec.placement.affinity,
        seed=spec.planner.seed,
        n_requests=spec.planner.simulated_requests,
        top_candidates=spec.planner.top_candidates,
        colocated_latency=coloc_model,
        assumptions=assumptions,
        token_budget=spec.engine.prefill_token_budget,
        max_batch=spec.engine.decode_max_batch,
        pin=pin_for(spec),
        serving_mode=spec.serving.mode,
    )


def pin_for(spec: api.DistServeDeploymentSpec) -> Pin | None:
    """spec.planner.pin with the GPU budget it must fit in, and the field that sets that budget."""
    pin = spec.planner.pin
    if pin is None:
        return None
    cluster = spec.cluster
    budget = cluster.gpu_budget
    where = "cluster.maxGPUs" if cluster.max_gpus is not None else "cluster.nodes × cluster.gpusPerNode"
    cap = spec.autoscaling.max_gpus
    if cap is not None and cap < budget:
        budget, where = cap, "autoscaling.maxGPUs"
    return Pin(
        PhaseChoice(pin.prefill.tp, pin.prefill.pp, pin.prefill.replicas),
        PhaseChoice(pin.decode.tp, pin.decode.pp, pin.decode.replicas),
        budget,
        where,
    )
