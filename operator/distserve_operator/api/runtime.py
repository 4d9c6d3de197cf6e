"""The runtime contract: everything the operator hands a worker, in one document (the plan
ConfigMap's `plan.json`).

What the planner assumed is what the workers run. The operator renders this document from the spec
and the plan; every worker validates it before loading anything (`distserve_worker.contract`) and
obeys it: its role's tensor- and pipeline-parallel degree, its stage's layer range, the engine limits
the simulator used (prefill token budget, decode batch, KV capacity) and the ports. The simulator
reads its engine limits from `EngineLimits` too, so plan and runtime cannot disagree on them.

Pure data and checks; no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from pydantic import Field, model_validator

from .base import ApiModel

# Re-exported: the contract's engine limits live in limits.py (PlanStatus carries them too).
from .limits import DEFAULT_DECODE_KV_TOKENS as DEFAULT_DECODE_KV_TOKENS
from .limits import DEFAULT_DECODE_MAX_BATCH as DEFAULT_DECODE_MAX_BATCH
from .limits import DEFAULT_PREFILL_TOKEN_BUDGET as DEFAULT_PREFILL_TOKEN_BUDGET
from .limits import EngineLimits as EngineLimits
from .spec import MAX_TP as MAX_TP
from .spec import RANK_PORT_OFFSET as RANK_PORT_OFFSET
from .spec import ModelSpec, Slo
from .status import PlanMode, PlanStatus

CONTRACT_VERSION: Final = "distserve.io/runtime/v1"

# Tensor-parallel follower ranks of an instance listen on gRPC port + RANK_PORT_OFFSET + rank
# (decode: MAX_TP more, so a SharedPod's prefill and decode ranks never collide).


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"  # one instance doing both phases (mode Colocated)


class LayerRange(ApiModel):
    """Decoder layers [start, end) held by one pipeline stage."""

    start: int = Field(..., ge=0, description="First layer (inclusive).")
    end: int = Field(..., ge=1, description="Last layer (exclusive).")

    @model_validator(mode="after")
    def _order(self) -> LayerRange:
        if self.end <= self.start:
            raise ValueError(f"layers [{self.start}, {self.end}) is empty: end must be greater than start")
        return self


class StageContract(ApiModel):
    """One pipeline stage of a role."""

    stage: int = Field(..., ge=0, description="Stage index, 0 first.")
    layers: LayerRange = Field(..., description="The decoder layers this stage holds.")
    service: str = Field(
        "", description="Headless Service (DNS name) whose pods are this stage; empty in local mode."
    )
    address: str = Field(
        "",
        description=(
            "gRPC address of this stage's pod in one instance, with `{ordinal}` standing for the "
            "instance's StatefulSet ordinal (every stage of instance k is ordinal k), e.g. "
            "`demo-prefill-s1-{ordinal}.demo-prefill-s1.default.svc:50051`. Each stage finds its "
            "neighbours here; empty in local mode, where `--stage-addresses` lists them."
        ),
    )


class PhaseContract(ApiModel):
    """How one role (prefill or decode) runs: parallelism and its stages."""

    tp: int = Field(..., ge=1, le=MAX_TP, description="Tensor-parallel ranks per stage (one device each).")
    pp: int = Field(..., ge=1, description="Pipeline stages per instance.")
    replicas: int = Field(..., ge=0, description="Instances.")
    stages: list[StageContract] = Field(..., min_length=1, description="One entry per stage, in order.")
    grpc_port: int = Field(..., ge=1, le=65535, description="gRPC port of rank 0 (the one the router calls).")
    metrics_port: int = Field(..., ge=1, le=65535, description="/healthz /readyz /metrics port.")
    rank_port_base: int = Field(
        ..., ge=1, le=65535, description="Follower rank r (1..tp-1) serves gRPC on rankPortBase + r."
    )

    @model_validator(mode="after")
    def _stages(self) -> PhaseContract:
        if len(self.stages) != self.pp:
            raise ValueError(f"pp is {self.pp} but {len(self.stages)} stages are listed: list one per stage")
        expected = 0
        for i, stage in enumerate(self.stages):
            if stage.stage != i:
                raise ValueError(
                    f"stages[{i}].stage is {stage.stage}: stages must be listed in order 0..pp-1"
                )
            if stage.layers.start != expected:
                raise ValueError(
                    f"stages[{i}].layers starts at {stage.layers.start}, expected {expected}: stages must "
                    "cover the layers contiguously"
                )
            expected = stage.layers.end
        return self

    @property
    def num_layers(self) -> int:
        return self.stages[-1].layers.end


class ModelShape(ApiModel):
    """The model shape the plan assumed; the worker checks it against the model it loads."""

    layers: int = Field(..., ge=1, description="Decoder layers.")
    heads: int = Field(..., ge=1, description="Attention heads.")
    kv_heads: int = Field(..., ge=1, description="Key/value heads.")


class RuntimeContract(ApiModel):
    """`plan.json`: the contract between the operator (or `distserve up`) and every worker."""

    version: Literal["distserve.io/runtime/v1"] = Field(
        CONTRACT_VERSION, description="Contract version; workers refuse another."
    )
    model: ModelSpec = Field(..., description="The model to serve (spec.model).")
    slo: Slo = Field(..., description="The SLOs (spec.slo); the router counts attainment against them.")
    shape: ModelShape | None = Field(None, description="Model shape the plan assumed, when known.")
    mode: PlanMode = Field(
        PlanMode.DISAGGREGATED, description="Disaggregated, or Colocated: the colocated entry says what runs."
    )
    prefill: PhaseContract = Field(..., description="How prefill instances run.")
    decode: PhaseContract = Field(..., description="How decode instances run.")
    colocated: PhaseContract | None = Field(
        None,
        description=(
            "Mode Colocated: how the colocated instances run (each serves both phases on one port). "
            "prefill and decode then describe these same instances, as the router sees them."
        ),
    )
    limits: EngineLimits = Field(default_factory=EngineLimits, description="Engine limits (simulated = run).")
    plan: PlanStatus | None = Field(None, description="The plan this contract came from (for people).")

    @model_validator(mode="after")
    def _consistent(self) -> RuntimeContract:
        if self.prefill.num_layers != self.decode.num_layers:
            raise ValueError(
                f"prefill stages cover {self.prefill.num_layers} layers and decode stages "
                f"{self.decode.num_layers}: both must cover the model's layers"
            )
        if (self.mode is PlanMode.COLOCATED) != (self.colocated is not None):
            raise ValueError(
                f"mode is {self.mode.value} but the colocated entry is "
                f"{'absent' if self.colocated is None else 'present'}: mode Colocated needs one, "
                "Disaggregated none"
            )
        if self.colocated is not None and self.colocated.num_layers != self.prefill.num_layers:
            raise ValueError(
                f"colocated stages cover {self.colocated.num_layers} layers and prefill stages "
                f"{self.prefill.num_layers}: both must cover the model's layers"
            )
        if self.shape is not None:
            if self.prefill.num_layers != self.shape.layers:
                raise ValueError(
                    f"stages cover {self.prefill.num_layers} layers but shape.layers is {self.shape.layers}"
                )
            roles = [Role.PREFILL, Role.DECODE] + ([Role.COLOCATED] if self.colocated is not None else [])
            for role in roles:
                reason = tp_refusal(self.shape.heads, self.shape.kv_heads, self.phase(role).tp)
                if reason:
                    raise ValueError(f"{role.value}.tp: {reason}")
        return self

    def phase(self, role: Role | str) -> PhaseContract:
        """The entry of `role`; ValueError for colocated when the contract has none (mode Disaggregated)."""
        role = Role(role)
        if role is Role.COLOCATED:
            if self.colocated is None:
                raise ValueError("the plan has no colocated entry (its mode is Disaggregated)")
            return self.colocated
        return self.prefill if role is Role.PREFILL else self.decode


def tp_refusal(heads: int, kv_heads: int, tp: int) -> str:
    """Why a model cannot be split over `tp` ranks by attention heads, or "" when it can."""
    if heads % tp:
        return f"TP{tp} does not divide the model's {heads} attention heads: use a TP that divides {heads}"
    if kv_heads % tp:
        return (
            f"TP{tp} does not divide the model's {kv_heads} key/value heads: use a TP that divides {kv_heads}"
        )
    return ""


def split_layers(num_layers: int, pp: int, stage_layers: list[int] | None = None) -> list[LayerRange]:
    """Contiguous layer ranges for `pp` stages: `stage_layers` layers each when given (the planner's
    cost-balanced split), else an even split (the first stages take the remainder)."""
    if pp > num_layers:
        raise ValueError(f"pp {pp} is more than the model's {num_layers} layers")
    if stage_layers is not None:
        if len(stage_layers) != pp or sum(stage_layers) != num_layers or min(stage_layers) < 1:
            raise ValueError(
                f"stageLayers {stage_layers} must give each of the {pp} stages at least one layer and "
                f"sum to the model's {num_layers} layers"
            )
        counts = list(stage_layers)
    else:
        base, extra = divmod(num_layers, pp)
        counts = [base + (1 if s < extra else 0) for s in range(pp)]
    out, start = [], 0
    for count in counts:
        out.append(LayerRange(start=start, end=start + count))
        start += count
    return out


def rank_port_base(grpc_port: int, role: Role | str) -> int:
    return grpc_port + RANK_PORT_OFFSET + (MAX_TP if Role(role) is Role.DECODE else 0)


def phase_contract(
    role: Role | str,
    tp: int,
    pp: int,
    replicas: int,
    num_layers: int,
    grpc_port: int,
    metrics_port: int,
    services: list[str] | None = None,
    stage_layers: list[int] | None = None,
    addresses: list[str] | None = None,
) -> PhaseContract:
    """`services`/`addresses`: per stage, its headless Service and its pods' address template
    (`StageContract.address`); `stage_layers`: the plan's layers per stage (even split without)."""
    ranges = split_layers(num_layers, pp, stage_layers)
    return PhaseContract(
        tp=tp,
        pp=pp,
        replicas=replicas,
        stages=[
            StageContract(
                stage=s,
                layers=r,
                service=(services[s] if services else ""),
                address=(addresses[s] if addresses else ""),
            )
            for s, r in enumerate(ranges)
        ],
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        rank_port_base=rank_port_base(grpc_port, role),
    )
