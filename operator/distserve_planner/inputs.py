"""From a `DistServeDeploymentSpec` (plus CLI/operator overrides) to the pure core's `PlanInput`."""

from __future__ import annotations

from pathlib import Path

from distserve_operator import api

from . import architecture, hardware, latency, profiles
from .core import PlanInput, WorkloadModel
from .pin import PhaseChoice, Pin
from .search import ClusterShape, SloTargets
from .workload import Lengths, read_trace


def latency_model_for(
    spec: api.DistServeDeploymentSpec,
    arch: architecture.ModelArchitecture,
    device: hardware.DeviceSpec,
    links: hardware.Links,
    profile: str | Path | None,
) -> latency.LatencyModel:
    if profile is None:
        return latency.analytical(arch, device, links.intra_node)
    return profiles.latency_model(profiles.load(profile, spec.model.name))


def plan_input(
    spec: api.DistServeDeploymentSpec,
    *,
    profile: str | Path | None = None,
    trace: str | Path | None = None,
    rate_override: float | None = None,
    workload_override: api.WorkloadSnapshot | None = None,
    colocated_profile: str | Path | None = None,
) -> PlanInput:
    """ValueError (naming the field and the fix) when the spec cannot be planned."""
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
    model = latency_model_for(spec, arch, device, links, profile)
    assumptions: dict[str, object] = {"latencySource": "profile file" if profile else "analytical"}
    if spec.planner.profile_config_map and profile is None:
        assumptions["profileConfigMap"] = (
            f"{spec.planner.profile_config_map} (not read offline: pass its profile.json with --profile)"
        )
    if trace:
        assumptions["trace"] = str(trace)
    coloc_model = None
    if colocated_profile is not None:
        coloc_model = profiles.latency_model(profiles.load(colocated_profile, spec.model.name))
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
