"""How long a batch takes: prefill `a + b*S + c*Q` (S tokens in the batch, Q = sum of squared prompt
lengths) and a decode step `a + b*ctx + c*batch`, all in milliseconds, per tensor-parallel degree.

The coefficients come from one of three places and end in the same `PhaseCoefficients`:
`analytical()` derives them from FLOPs, HBM bytes and all-reduce cost; `profiles.py` loads fitted
ones (ours or DistServe's). Pipeline parallelism is applied on top, the same way for all three
(`InstanceTiming`; the stages' layer split is stages.py's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .architecture import ModelArchitecture
from .hardware import DeviceSpec

Abc = tuple[float, float, float]

# Achievable shares of peak, calibrated once against DistServe's fitted OPT-13B/A100 profile (the
# unit tests hold the roofline within 15% of it for TP 1, 2, 4): matmuls reach 0.8 of peak (0.10
# ms/token prefill at TP1); attention kernels far less; an all-reduce of a few MB reaches only a
# quarter of the NVLink figure once launch and synchronisation are paid.
MATMUL_EFFICIENCY = 0.8
ATTENTION_EFFICIENCY = 0.25
HBM_EFFICIENCY = 0.8
LINK_EFFICIENCY = 0.25
# Fixed cost of handing activations from one pipeline stage to the next (send/recv setup), ms.
STAGE_HOP_MS = 0.2


NO_THRESHOLD = 1 << 30
DecodeRange = tuple[int, Abc]  # (first batch size it applies to, a b c)


def check_decode_starts(starts: list[int], name: str = "batch") -> None:
    """Decode ranges start at batch 1 and increase; `name` is what the caller calls a start."""
    if not starts or starts[0] != 1 or starts != sorted(set(starts)):
        raise ValueError(
            f"decode ranges must start at {name} 1 and increase (got {starts}); fix: sort the "
            "ranges and let the first one start at 1"
        )


def decode_range_abc(ranges: tuple[DecodeRange, ...], batch: int) -> Abc:
    """The coefficients of the range `batch` falls in (ranges ascending, the first from 1)."""
    chosen = ranges[0][1]
    for start, abc in ranges:  # a handful of ranges, in order
        if batch < start:
            break
        chosen = abc
    return chosen


@dataclass(frozen=True)
class PhaseCoefficients:
    """Milliseconds. Decode is piecewise in the batch size: `decode` holds one `a + b*ctx + c*batch`
    per range of batch sizes, each from its first batch size on (the first from 1).

    Why ranges: the matmul kernels change algorithm with the row count. DistServe's profiler fits
    two (small and large batches, `two_ranges`); on the CPU the local stack runs, a step of 15 rows
    costs 35% more than one of 16 (the BLAS switches from a per-row to a blocked kernel at 16
    rows, and at 4 before that), which one or two straight lines cannot follow.

    `padded`: how the engine batches requests of different lengths. False (packed: paged or
    variable-length attention, as vLLM and the DistServe prototype): a batch costs what the sum of
    its lengths costs. True (the distserve worker's padded batches): every row costs as much as
    the longest, so prefill pays for batch x longest tokens (and squares), decode for batch x the
    longest context."""

    prefill: Abc
    decode: tuple[DecodeRange, ...]
    padded: bool = False

    def __post_init__(self) -> None:
        check_decode_starts([start for start, _ in self.decode])

    @classmethod
    def two_ranges(
        cls, prefill: Abc, small: Abc, large: Abc, threshold: int = NO_THRESHOLD, padded: bool = False
    ) -> PhaseCoefficients:
        """DistServe's shape: `small` below `threshold` requests in a batch, `large` from it on."""
        if threshold <= 1:
            return cls(prefill, ((1, large),), padded)
        return cls(
            prefill, ((1, small),) if threshold >= NO_THRESHOLD else ((1, small), (threshold, large)), padded
        )

    def prefill_ms(self, tokens: float, sum_sq: float) -> float:
        """A batch of `tokens` prompt tokens whose squared lengths sum to `sum_sq` (for a padded
        batch: rows x longest and rows x longest^2; see `prefill_batch_ms`)."""
        a, b, c = self.prefill
        return a + b * tokens + c * sum_sq

    def decode_abc(self, batch: int) -> Abc:
        return decode_range_abc(self.decode, batch)

    def decode_ms(self, ctx_tokens: float, batch: int) -> float:
        a, b, c = self.decode_abc(batch)
        return a + b * ctx_tokens + c * batch


@dataclass(frozen=True)
class InstanceTiming:
    """Timing of one instance of TP*PP GPUs, the only thing the simulator needs.

    PP stages hold contiguous layers and hand activations on; a hop costs `hop_ms` plus
    `hop_ms_per_token` per token handed on (see `stage_hop`). `prefill_share` and `decode_share`
    are the busiest stage's share of the whole model's time under the plan's split (stages.py);
    0 means an even split, 1/PP.

    Prefill: a batch goes through every stage (the whole model's time) plus PP-1 hops of its
    activations; the busiest stage is free for the next batch after its share of the work, so
    stages work on different batches at once. Decode: the running batch of B is cut into
    m = min(PP, B) micro-batches that circulate; a request's token costs its micro-batch's trip
    through every stage plus PP hops, and throughput grows with PP only through the m micro-batches
    in flight (see `decode_abc`).
    """

    coefficients: PhaseCoefficients
    pp: int
    hop_ms: float = 0.0  # fixed cost of one stage-to-stage hand-off
    hop_ms_per_token: float = 0.0  # activations of one token over the stages' link
    prefill_share: float = 0.0
    decode_share: float = 0.0

    @property
    def padded(self) -> bool:
        return self.coefficients.padded

    def hop(self, tokens: float) -> float:
        """One hand-off of `tokens` tokens' activations between adjacent stages."""
        return self.hop_ms + self.hop_ms_per_token * tokens

    def prefill(self, tokens: float, sum_sq: float) -> tuple[float, float]:
        """(latency, busy): when the batch's first token is out, and when the next batch may start."""
        t = self.coefficients.prefill_ms(tokens, sum_sq)
        if self.pp == 1:
            return t, t
        share = self.prefill_share or 1.0 / self.pp
        return t + (self.pp - 1) * self.hop(tokens), t * share + self.hop(tokens)

    def decode_abc(self, batch: int) -> Abc:
        """Time per token of a request, `a + b*ctx + c*batch` at this batch size, PP folded in.

        With m = min(PP, B) micro-batches of B/m requests, a round (every request gets a token)
        takes the whole model's step for one micro-batch, a + (b*ctx + c*B)/m, plus PP hops of B/m
        tokens (PP-1 of hidden states; the last returns token ids, a fixed cost only). The busiest
        stage must also run all m micro-batches per round: m*share*(a + (b*ctx + c*B)/m), which
        exceeds the trip only as far as the split is uneven, so the step is scaled by
        f = max(1, m*share) (f = 1 for an even split and at batch 1)."""
        a, b, c = self.coefficients.decode_abc(batch)
        if self.pp == 1:
            return a, b, c
        m = min(self.pp, max(1, batch))
        f = max(1.0, m * (self.decode_share or 1.0 / self.pp))
        hops = self.pp * self.hop_ms
        per_row = (self.pp - 1) * self.hop_ms_per_token / m  # B/m tokens per hop, PP-1 such hops
        return f * a + hops, f * b / m, f * c / m + per_row


CoefficientSource = Callable[[int, int], PhaseCoefficients | None]


@dataclass(frozen=True)
class LatencyModel:
    """Coefficients per (TP, PP); `describe` is what the plan reports as its `profile`."""

    source: CoefficientSource
    describe: str
    missing_reason: str = ""  # why an absent (TP, PP) is absent, for rejected-candidate reports

    def coefficients(self, tp: int, pp: int) -> PhaseCoefficients | None:
        return self.source(tp, pp)

    def instance(
        self, tp: int, pp: int, hop_ms: float = 0.0, hop_ms_per_token: float = 0.0
    ) -> InstanceTiming | None:
        """A profile may hold an entry measured at this PP; otherwise PP is modelled from PP1."""
        exact = self.source(tp, pp) if pp > 1 else None
        if exact is not None:
            return InstanceTiming(exact, 1)
        base = self.source(tp, 1)
        return None if base is None else InstanceTiming(base, pp, hop_ms, hop_ms_per_token)


def analytical_coefficients(
    arch: ModelArchitecture, device: DeviceSpec, tp: int, link_bytes_per_s: float
) -> PhaseCoefficients:
    """Roofline-style coefficients. Prefill is compute-bound: per token the matmul FLOPs, per
    squared length the attention FLOPs, plus one read of the weights and the fixed step cost.
    Decode is memory-bound: every step reads the weights (a) and each context token's KV (b);
    each request in the batch adds its matmul FLOPs (c). TP splits all of these and adds two
    all-reduces of one hidden vector per token per layer (ring: 2(tp-1)/tp of the bytes)."""
    flops = device.flops * MATMUL_EFFICIENCY
    hbm = device.hbm_bytes_per_s * HBM_EFFICIENCY
    allreduce_bytes = 2 * arch.layers * arch.hidden_size * arch.dtype_bytes * 2 * (tp - 1) / tp
    allreduce_ms_per_token = allreduce_bytes / (link_bytes_per_s * LINK_EFFICIENCY) * 1e3 if tp > 1 else 0.0
    allreduce_latency_ms = 2 * arch.layers * 2 * (tp - 1) * device.allreduce_latency_s * 1e3
    fixed_ms = device.step_overhead_s * 1e3 + allreduce_latency_ms
    weights_ms = arch.weight_bytes / tp / hbm * 1e3
    per_token_ms = arch.flops_per_token / tp / flops * 1e3 + allreduce_ms_per_token
    per_sq_ms = 2.0 * arch.layers * arch.hidden_size / tp / (device.flops * ATTENTION_EFFICIENCY) * 1e3
    kv_read_ms = arch.kv_bytes_per_token / tp / hbm * 1e3
    lm_head_ms = arch.lm_head_flops / tp / flops * 1e3
    prefill = (fixed_ms + weights_ms, per_token_ms, per_sq_ms)
    decode = (fixed_ms + weights_ms, kv_read_ms, per_token_ms + lm_head_ms)
    return PhaseCoefficients(prefill, ((1, decode),))


def analytical(arch: ModelArchitecture, device: DeviceSpec, link_bytes_per_s: float) -> LatencyModel:
    cache: dict[int, PhaseCoefficients] = {}

    def source(tp: int, pp: int) -> PhaseCoefficients | None:
        if pp != 1:
            return None  # PP is modelled on top of PP1
        if tp not in cache:
            cache[tp] = analytical_coefficients(arch, device, tp, link_bytes_per_s)
        return cache[tp]

    return LatencyModel(source, f"analytical ({device.name} roofline)")


def stage_hop(
    arch: ModelArchitecture, link_bytes_per_s: float, device: DeviceSpec | None = None
) -> tuple[float, float]:
    """(fixed ms, ms per token) of one hand-off between stages: the send/receive cost (the device's
    `stage_hop_s`, which also carries the next stage's own per-forward cost; STAGE_HOP_MS without
    one), and one token's hidden state (hidden x dtype bytes) over the link the stages sit on."""
    fixed = device.stage_hop_s * 1e3 if device is not None else STAGE_HOP_MS
    return fixed, arch.hidden_size * arch.dtype_bytes / link_bytes_per_s * 1e3


def kv_transfer_ms(arch: ModelArchitecture, tokens: float, link_bytes_per_s: float, gpus: int) -> float:
    """Pulling one prompt's KV: every GPU of the smaller instance moves its shard in parallel."""
    return tokens * arch.kv_bytes_per_token / (link_bytes_per_s * max(1, gpus)) * 1e3
