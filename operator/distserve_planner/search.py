"""Search: the max rate one instance sustains per (TP, PP) and phase, then placements.

Per candidate the rate is found by bisection over simulated probes, bracketed by an analytic
capacity (a queue whose arrival rate exceeds its service rate is unstable however short the
simulation, so the simulated answer is capped by it; it also prunes hopeless candidates with one
probe). Results are cached per (phase, TP, PP, links): Algorithm 1, Algorithm 2 and the
colocated baseline share them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from distserve_operator.api import Bottleneck, tp_refusal

from . import simulator as sim
from . import stages
from .architecture import ModelArchitecture
from .hardware import DeviceSpec, Links
from .latency import InstanceTiming, LatencyModel, kv_transfer_ms, stage_hop
from .memory import Fit, check_fit
from .workload import Requests

Progress = Callable[[str], None]
REL_TOLERANCE = 1.02  # bisection stops when hi/lo is within 2%
MAX_DECODE_BATCH = 4096  # no engine limit given (tests, the paper's method): effectively unbounded


@dataclass(frozen=True)
class SloTargets:
    ttft_ms: float
    tpot_ms: float
    attainment: float  # 0..1


@dataclass(frozen=True)
class ClusterShape:
    gpus_per_node: int
    nodes: int
    budget: int  # max GPUs


@dataclass(frozen=True)
class PhaseResult:
    """One instance of one phase (or colocated) at one (TP, PP)."""

    phase: str  # prefill | decode | colocated
    tp: int
    pp: int
    max_rate: float  # requests/s at the attainment target; 0 when infeasible
    bottleneck: Bottleneck
    fit: Fit
    low_load_attainment: float = 0.0
    reason: str = ""  # why infeasible (memory, split, SLO)
    probes: int = 0
    split: stages.StageSplit | None = None  # layers per pipeline stage, what the plan deploys; None at PP1
    # What the rate was simulated with, so that a whole plan is simulated with the same timing:
    # the stages' link (one figure for a mix of NVLink and network hops, see `pipeline_bandwidth`)
    # and the nodes the pipeline spans (Algorithm 2 keeps the same layers on a node for both phases).
    stage_bw: float = 0.0
    node_span: int = 1

    @property
    def stage_layers(self) -> list[int] | None:
        return list(self.split.layers) if self.split is not None else None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def per_gpu(self) -> float:
        return self.max_rate / self.gpus

    @property
    def label(self) -> str:
        return f"TP{self.tp}xPP{self.pp}"


@dataclass
class Context:
    """Everything a probe needs, plus the cache and a probe counter for the benchmark.

    `token_budget` and `max_batch` are the engine limits the workers will run (spec.engine):
    the simulator uses exactly those, and the report writes them into the plan."""

    arch: ModelArchitecture
    device: DeviceSpec
    links: Links
    latency: LatencyModel
    slo: SloTargets
    requests: Requests
    token_budget: int
    progress: Progress | None = None
    cache: dict[tuple[object, ...], PhaseResult] = field(default_factory=dict)
    probes: int = 0
    max_batch: int = MAX_DECODE_BATCH  # sequences per decode step
    skipped: dict[int, str] = field(default_factory=dict)  # TP -> why the model cannot shard over it
    # How a colocated instance orders its forwards: our worker's, unless the baseline is scored as
    # another engine (core.colocated_scheduling).
    colocated_scheduling: sim.ColocatedScheduling = sim.ColocatedScheduling.WORKER

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    @property
    def longest_request(self) -> int:
        return max(i + o for i, o in zip(self.requests.inputs, self.requests.outputs, strict=True))


def bisect_rate(attain: Callable[[float], float], target: float, hi: float) -> tuple[float, float, int]:
    """(max rate with attain(rate) >= target, attainment at low load, probes). Rate 0 when even a
    trickle (2% of `hi`) misses the target."""
    lo = hi * 0.02
    low_att = attain(lo)
    probes = 1
    if low_att < target:
        return 0.0, low_att, probes
    probes += 1
    if attain(hi) >= target:
        return hi, low_att, probes
    while hi / lo > REL_TOLERANCE:
        mid = math.sqrt(lo * hi)
        probes += 1
        if attain(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo, low_att, probes


def divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def shardable_tps(ctx: Context, max_tp: int) -> list[int]:
    """TP degrees up to `max_tp` the model's heads split over. The others are refused up front,
    recorded with the reason (`ctx.skipped`) and never scored: a worker would refuse them."""
    out = []
    for tp in range(1, max_tp + 1):
        reason = tp_refusal(ctx.arch.heads, ctx.arch.kv_heads, tp)
        if not reason:
            out.append(tp)
        elif tp not in ctx.skipped:
            ctx.skipped[tp] = reason
            ctx.say(f"skipped: {reason}")
    return out


def parallel_configs(
    arch: ModelArchitecture, tps: Sequence[int], max_gpus: int, max_pp: int
) -> Iterator[tuple[int, int]]:
    """TP from `tps` (up to a node: TP all-reduces every layer, never across nodes), PP dividing
    the layers."""
    for tp in tps:
        for pp in divisors(arch.layers, max_pp):
            if tp * pp <= max_gpus:
                yield tp, pp


# ---------------------------------------------------------------------------- per-instance rates


def _timing(ctx: Context, tp: int, pp: int, stage_bw: float) -> InstanceTiming | None:
    """The instance's timing with its stages on links of `stage_bw` (an even split's shares)."""
    return ctx.latency.instance(tp, pp, *stage_hop(ctx.arch, stage_bw, ctx.device))


def pipeline_bandwidth(links: Links, pp: int, node_span: int) -> float:
    """One figure for the links of a pipeline of `pp` stages over `node_span` nodes: node_span - 1
    of its pp - 1 hops cross the network, the others stay on NVLink. A hop's cost is per byte, so
    the figure is the harmonic mean (its per-token cost is the hops' average)."""
    hops = pp - 1
    if hops <= 0 or node_span <= 1:
        return links.intra_node
    cross = min(hops, node_span - 1)
    return hops / (cross / links.inter_node + (hops - cross) / links.intra_node)


def _segments(arch: ModelArchitecture, reqs: Requests, pp: int, node_span: int) -> tuple[int, ...] | None:
    """Layers per node when a pipeline of `pp` stages spans `node_span` nodes; None within a node."""
    if node_span <= 1:
        return None
    return stages.node_segments(arch, node_span, reqs.mean_input + reqs.mean_output / 2)


def nests(arch: ModelArchitecture, reqs: Requests, pp: int, node_span: int) -> bool:
    """Whether `pp` stages split evenly over `node_span` nodes, at least one layer each."""
    if pp % node_span:
        return False
    segments = _segments(arch, reqs, pp, node_span)
    return segments is None or min(segments) >= pp // node_span


def prefill_stages(
    arch: ModelArchitecture, reqs: Requests, pp: int, node_span: int = 1
) -> stages.StageSplit | None:
    """Prefill's layer split for the workload's prompts; None at PP1. Over several nodes the
    nodes' layers are fixed first (`stages.node_segments`) and each node's split inside them."""
    if pp == 1:
        return None
    mean_sq = sum(i * i for i in reqs.inputs) / len(reqs)
    segments = _segments(arch, reqs, pp, node_span)
    if segments is not None:
        costs = stages.prefill_costs(arch, reqs.mean_input, mean_sq)
        return stages.nested_split(costs, segments, pp // node_span)
    return stages.prefill_split(arch, pp, reqs.mean_input, mean_sq)


def decode_stages(
    arch: ModelArchitecture, reqs: Requests, pp: int, batch: int, node_span: int = 1
) -> stages.StageSplit | None:
    """Decode's layer split, balanced for the micro-batches of a running batch of `batch`
    requests (the one the instance settles on): balance matters under load, and the KV those
    requests read on every layer shrinks the LM head's weight in the balance. None at PP1."""
    if pp == 1:
        return None
    rows = max(1, batch) / min(pp, max(1, batch))
    context = reqs.mean_input + reqs.mean_output / 2
    segments = _segments(arch, reqs, pp, node_span)
    if segments is not None:
        costs = stages.decode_costs(arch, max(1.0, rows), context)
        return stages.nested_split(costs, segments, pp // node_span)
    return stages.decode_split(arch, pp, rows, context)


def timing_of(ctx: Context, r: PhaseResult) -> InstanceTiming:
    """The timing `r`'s rate was found with (its links and split), to simulate it in a whole plan."""
    timing = _timing(ctx, r.tp, r.pp, r.stage_bw or ctx.links.intra_node)
    assert timing is not None  # only configurations the latency model has are ever scored
    if r.phase == "prefill":
        return with_stages(timing, prefill=r.split)
    return with_stages(timing, decode=r.split)


def with_stages(
    timing: InstanceTiming, prefill: stages.StageSplit | None = None, decode: stages.StageSplit | None = None
) -> InstanceTiming:
    """`timing` paced by the busiest stage of each split given."""
    if prefill is not None:
        timing = replace(timing, prefill_share=prefill.share)
    if decode is not None:
        timing = replace(timing, decode_share=decode.share)
    return timing


def _rejected(ctx: Context, phase: str, fit: Fit, reason: str, bottleneck: Bottleneck) -> PhaseResult:
    return PhaseResult(phase, fit.tp, fit.pp, 0.0, bottleneck, fit, reason=reason)


def prefill_rate(ctx: Context, tp: int, pp: int, stage_bw: float, node_span: int = 1) -> PhaseResult:
    key = ("prefill", tp, pp, stage_bw, node_span)
    if key in ctx.cache:
        return ctx.cache[key]
    fit = check_fit(ctx.arch, ctx.device, tp, pp, ctx.longest_request)
    timing = _timing(ctx, tp, pp, stage_bw)
    if not fit.ok or timing is None:
        reason = fit.reason or ctx.latency.missing_reason
        result = _rejected(ctx, "prefill", fit, reason, Bottleneck.MEMORY if fit.reason else Bottleneck.NONE)
    else:
        split = prefill_stages(ctx.arch, ctx.requests, pp, node_span)
        timing = with_stages(timing, prefill=split)
        reqs, target = ctx.requests, ctx.slo.attainment
        mean_in = reqs.mean_input
        mean_sq = sum(i * i for i in reqs.inputs) / len(reqs)
        per_batch = max(1.0, ctx.token_budget // mean_in)
        capacity = per_batch / timing.prefill(per_batch * mean_in, per_batch * mean_sq)[1] * 1e3

        def attain(rate: float) -> float:
            ctx.probes += 1
            arrivals = [t * 1e3 for t in reqs.arrivals(rate)]
            first = sim.simulate_prefill(timing, arrivals, reqs.inputs, ctx.token_budget)
            return sim.attainment([f - a for f, a in zip(first, arrivals, strict=True)], ctx.slo.ttft_ms)

        rate, low, probes = bisect_rate(attain, target, capacity)
        reason = "" if rate > 0 else _ttft_reason(ctx, timing, low)
        result = PhaseResult(
            "prefill", tp, pp, rate, Bottleneck.TTFT, fit, low, reason, probes, split, stage_bw, node_span
        )
    ctx.cache[key] = result
    ctx.say(f"prefill {result.label}: {result.max_rate:.2f} req/s per instance")
    return result


def _ttft_reason(ctx: Context, timing: InstanceTiming, low: float) -> str:
    i = int(_p90(ctx.requests.inputs))
    bare = timing.prefill(i, i * i)[0]
    return (
        f"TTFT: even at low load only {low:.0%} of requests meet {ctx.slo.ttft_ms:.0f} ms "
        f"(a p90 prompt of {i} tokens alone takes {bare:.0f} ms)"
    )


def _p90(values: Sequence[int]) -> float:
    ordered = sorted(values)
    return float(ordered[int(0.9 * (len(ordered) - 1))]) if ordered else 0.0


def decode_capacity(ctx: Context, timing: InstanceTiming, kv_tokens: int) -> tuple[float, Bottleneck]:
    """Largest stable decode throughput whose step time stays within the TPOT SLO, and what caps it:
    the SLO, the KV memory, or the engine's batch limit."""
    rate, bottleneck, _ = decode_operating_point(ctx, timing, kv_tokens)
    return rate, bottleneck


def decode_operating_point(
    ctx: Context, timing: InstanceTiming, kv_tokens: int
) -> tuple[float, Bottleneck, int]:
    """`decode_capacity`, and the running batch it is reached at (0 when none meets the SLO)."""
    reqs = ctx.requests
    mean_in, mean_out = reqs.mean_input, reqs.mean_output
    by_memory = max(1, int(kv_tokens // (mean_in + mean_out)))
    largest = min(by_memory, ctx.max_batch, MAX_DECODE_BATCH)

    # A padded batch pays for its longest row in every row: take a long prompt (p90) as typical.
    per_row = (_p90(reqs.inputs) if timing.padded else mean_in) + mean_out / 2

    def step_ms(batch: int) -> float:
        a, b, c = timing.decode_abc(batch)
        return a + b * batch * per_row + c * batch

    # The step cost is piecewise in the batch size and need not grow across a range's start (a
    # kernel change can make 16 rows cheaper than 15), so search each range on its own: within
    # one, the cost grows with the batch (non-negative coefficients), and a bisection holds.
    starts = [start for start, _ in timing.coefficients.decode]
    batch = 0
    for lo, nxt in zip(starts, [*starts[1:], largest + 1], strict=True):
        hi = min(nxt - 1, largest)
        if lo > hi:
            break
        fits = _largest_batch_within(step_ms, lo, hi, ctx.slo.tpot_ms)
        if fits and (not batch or fits / step_ms(fits) > batch / step_ms(batch)):
            batch = fits
    if batch < 1:
        return 0.0, Bottleneck.TPOT, 0
    if batch < largest:
        bottleneck = Bottleneck.TPOT
    elif largest == ctx.max_batch < by_memory:
        bottleneck = Bottleneck.BATCH  # the engine's decodeMaxBatch, not memory, stops the batch
    else:
        bottleneck = Bottleneck.MEMORY
    return batch / (step_ms(batch) * max(1.0, mean_out - 1)) * 1e3, bottleneck, batch


def _largest_batch_within(step_ms: Callable[[int], float], lo: int, hi: int, limit: float) -> int:
    """Largest batch in [lo, hi] whose step takes at most `limit` ms (0: none), for a step cost
    that grows with the batch."""
    if step_ms(lo) > limit:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if step_ms(mid) <= limit else (lo, mid - 1)
    return lo


def decode_rate(
    ctx: Context,
    tp: int,
    pp: int,
    stage_bw: float,
    transfer_bw: float,
    transfer_gpus: int,
    node_span: int = 1,
) -> PhaseResult:
    key = ("decode", tp, pp, stage_bw, transfer_bw, transfer_gpus, node_span)
    if key in ctx.cache:
        return ctx.cache[key]
    fit = check_fit(ctx.arch, ctx.device, tp, pp, ctx.longest_request)
    timing = _timing(ctx, tp, pp, stage_bw)
    if not fit.ok or timing is None:
        reason = fit.reason or ctx.latency.missing_reason
        result = _rejected(ctx, "decode", fit, reason, Bottleneck.MEMORY if fit.reason else Bottleneck.NONE)
    else:
        reqs = ctx.requests
        # The split is balanced for the batch the instance runs at, found with an even split's
        # timing first; the capacity is then the split's own (the busiest stage paces the round).
        _, _, batch = decode_operating_point(ctx, timing, fit.kv_tokens)
        split = decode_stages(ctx.arch, reqs, pp, batch, node_span)
        timing = with_stages(timing, decode=split)
        capacity, bottleneck = decode_capacity(ctx, timing, fit.kv_tokens)
        transfer = [kv_transfer_ms(ctx.arch, i, transfer_bw, transfer_gpus) for i in reqs.inputs]
        if capacity <= 0:
            result = PhaseResult(
                "decode",
                tp,
                pp,
                0.0,
                Bottleneck.TPOT,
                fit,
                0.0,
                f"TPOT: one decode step takes longer than {ctx.slo.tpot_ms:.0f} ms even with one request",
                split=split,
                stage_bw=stage_bw,
                node_span=node_span,
            )
        else:

            def attain(rate: float) -> float:
                # The prefill's latency only shifts a request in time; decode sees arrivals at `rate`.
                ctx.probes += 1
                first = [t * 1e3 for t in reqs.arrivals(rate)]
                ready = [f + x for f, x in zip(first, transfer, strict=True)]
                out = sim.simulate_decode(
                    timing, ready, reqs.inputs, reqs.outputs, fit.kv_tokens, ctx.max_batch
                )
                return sim.attainment(sim.tpot(first, out.last_token, reqs.outputs), ctx.slo.tpot_ms)

            rate, low, probes = bisect_rate(attain, ctx.slo.attainment, capacity)
            reason = (
                ""
                if rate > 0
                else f"TPOT: only {low:.0%} of requests meet {ctx.slo.tpot_ms:.0f} ms at low load"
            )
            if rate > 0 and mean(transfer) > 0.25 * ctx.slo.tpot_ms * max(1.0, reqs.mean_output - 1):
                bottleneck = Bottleneck.TRANSFER
            result = PhaseResult(
                "decode", tp, pp, rate, bottleneck, fit, low, reason, probes, split, stage_bw, node_span
            )
    ctx.cache[key] = result
    ctx.say(f"decode {result.label}: {result.max_rate:.2f} req/s per instance")
    return result


def colocated_rate(ctx: Context, tp: int, pp: int, stage_bw: float) -> PhaseResult:
    key = ("colocated", tp, pp, stage_bw)
    if key in ctx.cache:
        return ctx.cache[key]
    fit = check_fit(ctx.arch, ctx.device, tp, pp, ctx.longest_request)
    timing = _timing(ctx, tp, pp, stage_bw)
    if not fit.ok or timing is None:
        reason = fit.reason or ctx.latency.missing_reason
        result = _rejected(
            ctx, "colocated", fit, reason, Bottleneck.MEMORY if fit.reason else Bottleneck.NONE
        )
    else:
        reqs = ctx.requests
        p_cap = prefill_rate(ctx, tp, pp, stage_bw)
        d_cap, d_bottleneck = decode_capacity(ctx, timing, fit.kv_tokens)
        # Prefill and decode share the GPUs' time: the shares rate/prefill_cap + rate/decode_cap
        # must stay below 1, or the queue grows without bound (a short simulation would hide it).
        per_batch = max(1.0, ctx.token_budget // reqs.mean_input)
        mean_sq = sum(i * i for i in reqs.inputs) / len(reqs)
        pf_cap = per_batch / timing.prefill(per_batch * reqs.mean_input, per_batch * mean_sq)[0] * 1e3
        capacity = 1 / (1 / pf_cap + 1 / d_cap) if d_cap > 0 else 0.0
        if capacity <= 0 or p_cap.max_rate <= 0:
            reason = p_cap.reason or "TPOT: one decode step exceeds the SLO"
            result = PhaseResult(
                "colocated",
                tp,
                pp,
                0.0,
                Bottleneck.TTFT if p_cap.reason else Bottleneck.TPOT,
                fit,
                0.0,
                reason,
            )
        else:
            outcome: dict[str, float] = {}

            def attain(rate: float) -> float:
                ctx.probes += 1
                arrivals = [t * 1e3 for t in reqs.arrivals(rate)]
                first, last = sim.simulate_colocated(
                    timing,
                    arrivals,
                    reqs.inputs,
                    reqs.outputs,
                    fit.kv_tokens,
                    ctx.token_budget,
                    ctx.max_batch,
                    ctx.colocated_scheduling,
                )
                ttft = [f - a for f, a in zip(first, arrivals, strict=True)]
                tpots = sim.tpot(first, last, reqs.outputs)
                outcome["ttft"] = sim.attainment(ttft, ctx.slo.ttft_ms)
                outcome["tpot"] = sim.attainment(tpots, ctx.slo.tpot_ms)
                return sim.joint_attainment(ttft, tpots, ctx.slo.ttft_ms, ctx.slo.tpot_ms)

            rate, low, probes = bisect_rate(attain, ctx.slo.attainment, capacity)
            if rate > 0:
                attain(rate * REL_TOLERANCE)  # which SLO breaks first just above the max rate
            bottleneck = Bottleneck.TTFT if outcome.get("ttft", 0) <= outcome.get("tpot", 0) else d_bottleneck
            reason = "" if rate > 0 else f"only {low:.0%} of requests meet both SLOs at low load"
            result = PhaseResult("colocated", tp, pp, rate, bottleneck, fit, low, reason, probes)
    ctx.cache[key] = result
    ctx.say(f"colocated {result.label}: {result.max_rate:.2f} req/s per instance")
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def colocated(ctx: Context, shape: ClusterShape) -> list[PhaseResult]:
    stage_bw = ctx.links.intra_node
    configs = parallel_configs(
        ctx.arch,
        shardable_tps(ctx, shape.gpus_per_node),
        min(shape.budget, shape.gpus_per_node),
        shape.budget,
    )
    results = [colocated_rate(ctx, tp, pp, stage_bw) for tp, pp in configs]
    return sorted(results, key=lambda r: r.per_gpu, reverse=True)


def exhaustive_one_to_one(ctx: Context, shape: ClusterShape) -> list[tuple[float, PhaseResult, PhaseResult]]:
    """The paper's method, for a same-run baseline: every (prefill, decode) pair simulated together
    at a fixed 1:1 ratio, bisection over the joint attainment, no analytic bound or caching by phase.
    Like the paper's simulator it bounds no decode batch (so it stays comparable with its figures)."""
    stage_bw = ctx.links.intra_node
    configs = list(
        parallel_configs(ctx.arch, shardable_tps(ctx, shape.gpus_per_node), shape.budget, shape.budget)
    )
    reqs = ctx.requests
    out = []
    for ptp, ppp in configs:
        for dtp, dpp in configs:
            if ptp * ppp + dtp * dpp > shape.budget:
                continue
            pfit = check_fit(ctx.arch, ctx.device, ptp, ppp, ctx.longest_request)
            dfit = check_fit(ctx.arch, ctx.device, dtp, dpp, ctx.longest_request)
            pt = _timing(ctx, ptp, ppp, stage_bw)
            dt = _timing(ctx, dtp, dpp, stage_bw)
            if not (pfit.ok and dfit.ok) or pt is None or dt is None:
                continue
            # Like the paper's simulator, no batch limit: balance decode for a full pipeline of
            # one-request micro-batches.
            psplit, dsplit = prefill_stages(ctx.arch, reqs, ppp), decode_stages(ctx.arch, reqs, dpp, dpp)
            pt, dt = with_stages(pt, prefill=psplit), with_stages(dt, decode=dsplit)

            def attain(
                rate: float, pt: InstanceTiming = pt, dt: InstanceTiming = dt, kv: int = dfit.kv_tokens
            ) -> float:
                ctx.probes += 1
                arrivals = [t * 1e3 for t in reqs.arrivals(rate)]
                # Like the paper: no KV transfer time.
                outcome = sim.simulate_disaggregated(
                    [pt], [dt], kv, lambda i: 0.0, arrivals, reqs.inputs, reqs.outputs, ctx.token_budget
                )
                return outcome.attainment(ctx.slo.ttft_ms, ctx.slo.tpot_ms)

            rate, _, _ = bisect_rate(attain, ctx.slo.attainment, 100.0)
            gpus = ptp * ppp + dtp * dpp
            p = PhaseResult("prefill", ptp, ppp, rate, Bottleneck.NONE, pfit, split=psplit)
            d = PhaseResult("decode", dtp, dpp, rate, Bottleneck.NONE, dfit, split=dsplit)
            out.append((rate / gpus, p, d))
    out.sort(key=lambda x: x[0], reverse=True)
    return out
