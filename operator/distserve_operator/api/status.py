"""`DistServeDeployment.status`: what the operator decided and saw. Only our schema; kopf keeps its
bookkeeping in annotations. Floats appear here (estimates, observations), never in spec."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .base import ApiModel
from .limits import EngineLimits


class ConditionType(StrEnum):
    PLANNED = "Planned"
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    PLAN_DRIFT = "PlanDrift"
    SCHEDULABLE = "Schedulable"
    PROFILED = "Profiled"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: ConditionType = Field(
        ..., description="Planned, Ready, Progressing, Degraded, PlanDrift, Schedulable or Profiled."
    )
    status: ConditionStatus = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., min_length=1, description="One CamelCase word for machines.")
    message: str = Field("", description="What happened and, on failure, the fix.")
    last_transition_time: str = Field(..., description="RFC 3339 time the status last changed.")
    observed_generation: int | None = Field(None, ge=0, description="The spec generation this reflects.")


class Bottleneck(StrEnum):
    TTFT = "TTFT"
    TPOT = "TPOT"
    MEMORY = "Memory"
    BATCH = "Batch"
    TRANSFER = "Transfer"
    NONE = "None"


class _Instances:
    """GPUs of `replicas` instances of `tp` x `pp` devices (phase and colocated plans)."""

    tp: int
    pp: int
    replicas: int

    @property
    def gpus_per_instance(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.replicas


class PhasePlan(ApiModel, _Instances):
    """Parallelism and replica count of one phase (prefill or decode)."""

    tp: int = Field(..., ge=1, description="Tensor-parallel degree (GPUs per stage).")
    pp: int = Field(..., ge=1, description="Pipeline-parallel degree (stages per instance).")
    replicas: int = Field(..., ge=0, description="Instances.")
    max_rate_per_instance: float | None = Field(
        None, ge=0, description="Requests/s one instance sustains at the SLO attainment target."
    )
    stage_layers: list[int] | None = Field(
        None,
        description=(
            "Decoder layers per pipeline stage, in order (one entry per stage): the planner's split, "
            "balanced by cost with the embeddings counted on the first stage and the LM head on the "
            "last. Absent: an even split."
        ),
    )


class Estimate(ApiModel):
    """What the simulator predicts for the plan."""

    goodput_per_gpu: float = Field(
        ..., alias="goodputPerGPU", ge=0, description="Requests/s per GPU at the SLO."
    )
    goodput: float | None = Field(None, ge=0, description="Requests/s of the whole deployment at the SLO.")
    attainment_percent: float | None = Field(
        None, ge=0, le=100, description="Predicted SLO attainment at the workload's rate."
    )
    ttft_p90_millis: float | None = Field(
        None, ge=0, description="Predicted p90 TTFT at the workload's rate."
    )
    tpot_p90_millis: float | None = Field(
        None, ge=0, description="Predicted p90 TPOT at the workload's rate."
    )


class Candidate(ApiModel):
    """A configuration the planner scored."""

    prefill: PhasePlan = Field(..., description="Prefill parallelism and replicas.")
    decode: PhasePlan = Field(..., description="Decode parallelism and replicas.")
    gpus: int = Field(..., ge=0, description="GPUs the candidate uses.")
    goodput_per_gpu: float = Field(
        ..., alias="goodputPerGPU", ge=0, description="Requests/s per GPU at the SLO."
    )
    bottleneck: Bottleneck = Field(
        ..., description="What limits it first: TTFT, TPOT, Memory, Batch (decodeMaxBatch) or Transfer."
    )
    attainment_percent: float | None = Field(
        None, ge=0, le=100, description="Predicted SLO attainment of the candidate at the workload's rate."
    )


class ColocatedPlan(ApiModel, _Instances):
    """Colocated instances: both phases in one instance (vLLM-style)."""

    tp: int = Field(..., ge=1, description="Tensor-parallel degree.")
    pp: int = Field(..., ge=1, description="Pipeline-parallel degree.")
    replicas: int = Field(..., ge=0, description="Instances.")
    goodput_per_gpu: float = Field(
        ..., alias="goodputPerGPU", ge=0, description="Requests/s per GPU at the SLO."
    )
    max_rate_per_instance: float | None = Field(
        None, ge=0, description="Requests/s one instance sustains at the SLO attainment target."
    )
    stage_layers: list[int] | None = Field(
        None, description="Decoder layers per pipeline stage, in order; absent: an even split."
    )
    limits: EngineLimits | None = Field(
        None,
        description=(
            "Engine limits this instance was simulated with (its KV capacity is its own memory fit's); "
            "the colocated workers run exactly these."
        ),
    )


class PlanMode(StrEnum):
    """What a plan deploys (spec.serving.mode Auto resolves to one of these)."""

    DISAGGREGATED = "Disaggregated"
    COLOCATED = "Colocated"


class GpuBudget(ApiModel):
    """The GPUs a plan was made within: the nominal cluster, or what the cluster can actually schedule."""

    nominal: int = Field(..., ge=0, description="GPUs spec.cluster (and autoscaling.maxGPUs) allow.")
    allocatable: int | None = Field(
        None,
        ge=0,
        description=(
            "GPUs this deployment can get now: nodes' allocatable minus what other pods request, within any "
            "ResourceQuota; unset when the operator cannot see them."
        ),
    )
    planned_within: int = Field(..., ge=0, description="The budget the planner searched within.")
    message: str = Field("", description="Where the figures come from.")


class PlacementAffinity(StrEnum):
    HIGH = "High"
    LOW = "Low"


class PlanStatus(ApiModel):
    """The plan the operator deployed."""

    mode: PlanMode = Field(
        PlanMode.DISAGGREGATED,
        description=(
            "What runs: Disaggregated (the prefill and decode instances) or Colocated (the colocated "
            "instances; prefill and decode are then the disaggregated alternative, for comparison)."
        ),
    )
    mode_reason: str = Field(
        "", description="Why this mode runs (spec.serving.mode and, for Auto, the verdict)."
    )
    prefill: PhasePlan = Field(..., description="Prefill instances (mode Disaggregated).")
    decode: PhasePlan = Field(..., description="Decode instances (mode Disaggregated).")
    affinity: PlacementAffinity = Field(
        ..., description="Placement algorithm used (High or Low node affinity)."
    )
    node_span: int = Field(1, ge=1, description="Nodes one pipeline spans (Low affinity); 1 otherwise.")
    gpus: int = Field(..., ge=0, description="GPUs the plan uses.")
    summary: str = Field(..., description="One line, e.g. 'prefill TP2x1 ×2 | decode TP1x1 ×3'.")
    estimated: Estimate = Field(..., description="Predicted performance.")
    bottleneck: Bottleneck = Field(Bottleneck.NONE, description="What limits the chosen plan first.")
    feasible: bool = Field(
        True, description="False when no candidate meets the SLO; the plan is the closest one."
    )
    candidates: list[Candidate] = Field(
        default_factory=list, description="Top candidates by goodput per GPU."
    )
    colocated: ColocatedPlan | None = Field(
        None,
        description=(
            "Colocated instances (prefill+decode in one instance): what runs when mode is Colocated, "
            "else the best colocated alternative."
        ),
    )
    disaggregation_pays: bool | None = Field(
        None,
        description="True when the disaggregated plan's goodput per GPU beats the best colocated one.",
    )
    verdict: str = Field("", description="Plain-language verdict and why.")
    limits: EngineLimits | None = Field(
        None,
        description=(
            "Engine limits the plan was simulated with (prefill token budget, decode batch, decode KV "
            "capacity), for the instances of its mode; the workers run exactly these."
        ),
    )
    pinned: bool = Field(
        False,
        description="True when spec.planner.pin fixed this plan; the planner evaluated it, not chose it.",
    )
    planner_choice: Candidate | None = Field(
        None, description="Pinned plans: the planner's own best choice, for comparison (see verdict)."
    )
    profile: str = Field(
        "", description="Latency model the plan used (analytical, profile file, DistServe import)."
    )
    search_seconds: float | None = Field(None, ge=0, description="Planner wall time.")
    gpu_budget: GpuBudget | None = Field(
        None,
        alias="gpuBudget",
        description="The GPUs the plan was made within (allocatable ones when fewer than nominal).",
    )


class WorkloadSnapshot(ApiModel):
    """A workload: the plan's assumptions or what was observed."""

    requests_per_second: float = Field(..., ge=0, description="Arrival rate.")
    input_tokens_mean: float | None = Field(None, ge=0, description="Mean prompt tokens.")
    input_tokens_p90: float | None = Field(None, ge=0, description="p90 prompt tokens.")
    output_tokens_mean: float | None = Field(None, ge=0, description="Mean output tokens.")
    output_tokens_p90: float | None = Field(None, ge=0, description="p90 output tokens.")
    attainment_percent: float | None = Field(None, ge=0, le=100, description="Share meeting both SLOs.")
    window_seconds: int | None = Field(None, ge=0, description="Window measured over.")
    time: str | None = Field(None, description="RFC 3339 time of the observation.")


class RoleStatus(ApiModel):
    """Replicas of one role and stage."""

    name: str = Field(..., description="Role (prefill, decode, router) and stage, e.g. prefill-s0.")
    replicas: int = Field(..., ge=0, description="Desired replicas.")
    ready_replicas: int = Field(0, ge=0, description="Ready replicas.")


class Replan(ApiModel):
    """The last traffic-driven re-plan."""

    time: str = Field(..., description="RFC 3339 time of the last re-plan.")
    reason: str = Field(..., description="Why it re-planned.")


class RoleRollout(ApiModel):
    """One role during a staged rollout: ready instances of the old and the new groups."""

    name: str = Field(..., description="prefill or decode.")
    old_ready: int = Field(0, ge=0, description="Ready instances of the old groups.")
    new_ready: int = Field(0, ge=0, description="Ready instances of the new groups.")
    new_desired: int = Field(0, ge=0, description="Instances the new plan wants.")


class Rollout(ApiModel):
    """A staged re-plan in progress: new instance groups beside the old ones until they are Ready."""

    old_revision: str = Field(..., description="Revision (parallelism hash) of the groups going away.")
    new_revision: str = Field(..., description="Revision of the groups coming up.")
    old_plan: str = Field("", description="The old plan, one line.")
    new_plan: str = Field("", description="The new plan, one line.")
    started: str = Field(..., description="RFC 3339 time the rollout began.")
    step: str = Field(
        ...,
        description=(
            "StartingNew (new groups coming up, old ones serving), DrainingOld (new groups Ready, old ones "
            "finishing their requests) or RemovingOld."
        ),
    )
    roles: list[RoleRollout] = Field(default_factory=list, description="Progress per role.")


class DistServeDeploymentStatus(ApiModel):
    """The plan, conditions and observed workload, written by the operator."""

    observed_generation: int | None = Field(None, ge=0, description="Spec generation the status reflects.")
    conditions: list[Condition] = Field(default_factory=list, description="Planned, Ready, Progressing, ...")
    plan: PlanStatus | None = Field(None, description="The current plan.")
    assumptions: WorkloadSnapshot | None = Field(None, description="Workload the plan was sized for.")
    observed: WorkloadSnapshot | None = Field(None, description="Workload measured from traffic.")
    roles: list[RoleStatus] = Field(default_factory=list, description="Replicas per role.")
    last_replan: Replan | None = Field(None, description="Last traffic-driven re-plan.")
    rollout: Rollout | None = Field(None, description="The staged rollout in progress, if any.")
