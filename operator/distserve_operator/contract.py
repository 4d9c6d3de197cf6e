"""The runtime contract for a spec and its plan: the `plan.json` every worker obeys.

`runtime_contract(spec, plan)` is the one way to build it: the operator writes it into the plan
ConfigMap (children.render_plan_configmap, with the pods' ports and Services) and `distserve up`
can write the same document for local processes. It carries what the planner assumed, so the
workers run what was simulated: the model shape, each role's tp, pp and stage layer ranges, the
ports, and the engine limits the simulation used (`PlanStatus.limits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .api import (
    DistServeDeploymentSpec,
    EngineLimits,
    ModelShape,
    ModelSpec,
    PhaseContract,
    PlanMode,
    PlanStatus,
    Role,
    RuntimeContract,
    Slo,
    phase_contract,
)


def model_shape(spec: DistServeDeploymentSpec) -> ModelShape:
    """Layers and heads as the planner resolved them (spec, GGUF, config.json or its catalogue):
    the shape the plan's tp and stages were chosen for. ValueError names the field to set."""
    from distserve_planner.loaders.architecture import resolve

    arch = resolve(spec.model)
    return ModelShape(layers=arch.layers, heads=arch.heads, kv_heads=arch.kv_heads)


def plan_limits(spec: DistServeDeploymentSpec, plan: PlanStatus) -> EngineLimits:
    """The limits the plan was simulated with; recomputed the same way for a plan recorded before
    plans carried them."""
    if plan.limits is not None:
        return plan.limits
    from distserve_planner import engine_limits

    return engine_limits(spec, plan.decode.tp, plan.decode.pp)


def runtime_contract(
    spec: DistServeDeploymentSpec,
    plan: PlanStatus,
    *,
    ports: Mapping[str, tuple[int, int]] | None = None,
    services: Mapping[str, Sequence[str]] | None = None,
    shape: ModelShape | None = None,
    addresses: Mapping[str, Sequence[str]] | None = None,
) -> RuntimeContract:
    """The contract for `plan` of `spec`.

    `ports`: role -> (gRPC, metrics) port of its rank 0 (default: spec.worker's for both roles);
    `services`: role -> one headless Service name per stage ("" where none selects just that
    stage; omitted in local mode); `addresses`: role -> one pod address template per stage
    (`StageContract.address`); `shape`: the model shape (default: resolved from spec.model).
    """
    default = (spec.worker.grpc_port, spec.worker.metrics_port)
    return assemble(
        spec.model,
        spec.slo,
        plan,
        shape or model_shape(spec),
        plan_limits(spec, plan),
        ports={role.value: (ports or {}).get(role.value, default) for role in Role},
        services=services,
        addresses=addresses,
    )


def assemble(
    model: ModelSpec,
    slo: Slo,
    plan: PlanStatus | None,
    shape: ModelShape,
    limits: EngineLimits,
    *,
    ports: Mapping[str, tuple[int, int]],
    services: Mapping[str, Sequence[str]] | None = None,
    phases: Mapping[str, tuple[int, int, int]] | None = None,
    addresses: Mapping[str, Sequence[str]] | None = None,
) -> RuntimeContract:
    """The contract from its parts (what `runtime_contract` and `distserve up` share). `phases`:
    role -> (tp, pp, replicas), by default the plan's; `ports`: role -> (gRPC, metrics). The
    stages' layer ranges are the plan's split (`PhasePlan.stageLayers`) when it has one for that pp.
    A plan in mode Colocated gives a colocated entry (`phases["colocated"]` or the plan's), and
    prefill and decode entries that are those same instances, on the colocated ports."""
    if plan is not None and plan.mode is PlanMode.COLOCATED:
        return _colocated(model, slo, plan, shape, limits, ports, services, phases, addresses)
    built = {}
    for role in (Role.PREFILL, Role.DECODE):
        planned = None
        if plan is not None:
            planned = plan.prefill if role is Role.PREFILL else plan.decode
        if phases is not None:
            tp, pp, replicas = phases[role.value]
        else:
            assert planned is not None, "give phases or a plan"
            tp, pp, replicas = planned.tp, planned.pp, planned.replicas
        stage_layers = planned.stage_layers if planned is not None and planned.pp == pp else None
        built[role] = _entry(
            role,
            (tp, pp, replicas),
            shape,
            ports[role.value],
            (services or {}).get(role.value),
            stage_layers,
            (addresses or {}).get(role.value),
        )
    return RuntimeContract(
        model=model,
        slo=slo,
        shape=shape,
        prefill=built[Role.PREFILL],
        decode=built[Role.DECODE],
        limits=limits,
        plan=plan,
    )


def _entry(
    role: Role,
    instances: tuple[int, int, int],
    shape: ModelShape,
    ports: tuple[int, int],
    services: Sequence[str] | None,
    stage_layers: list[int] | None,
    addresses: Sequence[str] | None,
) -> PhaseContract:
    """One role's entry: (tp, pp, replicas), its (gRPC, metrics) ports and its stages."""
    tp, pp, replicas = instances
    return phase_contract(
        role,
        tp,
        pp,
        replicas,
        shape.layers,
        *ports,
        list(services) if services else None,
        stage_layers,
        list(addresses) if addresses else None,
    )


def _colocated(
    model: ModelSpec,
    slo: Slo,
    plan: PlanStatus,
    shape: ModelShape,
    limits: EngineLimits,
    ports: Mapping[str, tuple[int, int]],
    services: Mapping[str, Sequence[str]] | None,
    phases: Mapping[str, tuple[int, int, int]] | None,
    addresses: Mapping[str, Sequence[str]] | None,
) -> RuntimeContract:
    planned = plan.colocated
    if planned is None:
        raise ValueError("a plan in mode Colocated needs plan.colocated (re-plan it)")
    role = Role.COLOCATED.value
    tp, pp, replicas = (phases or {}).get(role) or (planned.tp, planned.pp, planned.replicas)
    stage_layers = planned.stage_layers if planned.pp == pp else None
    # One process serves both phases on one port: the router reaches it as either.
    grpc_port, metrics_port = ports.get(role) or ports[Role.PREFILL.value]
    stage_services = (services or {}).get(role) or (services or {}).get(Role.PREFILL.value)
    stage_addresses = (addresses or {}).get(role) or (addresses or {}).get(Role.PREFILL.value)

    def entry(as_role: Role) -> PhaseContract:
        return _entry(
            as_role,
            (tp, pp, replicas),
            shape,
            (grpc_port, metrics_port),
            stage_services,
            stage_layers,
            stage_addresses,
        )

    return RuntimeContract(
        model=model,
        slo=slo,
        shape=shape,
        mode=PlanMode.COLOCATED,
        prefill=entry(Role.PREFILL),
        decode=entry(Role.DECODE),
        colocated=entry(Role.COLOCATED),
        limits=limits,
        plan=plan,
    )
