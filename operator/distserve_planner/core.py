"""`plan(PlanInput) -> PlanReport`: pure. No clock but the one injected, no I/O, no global state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from distserve_operator import api

from . import pin as pinning
from . import simulator as sim
from .architecture import ModelArchitecture
from .hardware import DeviceSpec, Links
from .latency import InstanceTiming, LatencyModel, kv_transfer_ms, stage_hop
from .memory import Fit, check_fit
from .mode import decide as decide_mode
from .pin import PhaseChoice, Pin
from .report import PlanReport, build_report
from .search import (
    ClusterShape,
    Context,
    PhaseResult,
    Placement,
    Progress,
    SloTargets,
    colocated,
    decode_stages,
    exhaustive_one_to_one,
    high_affinity,
    low_affinity,
    prefill_stages,
    stage_link,
    with_stages,
)
from .workload import Lengths, Requests, generate

# Prefill batches stop growing at this many tokens (or one prompt, if longer): see api.limits.
DEFAULT_TOKEN_BUDGET = api.DEFAULT_PREFILL_TOKEN_BUDGET
MAX_JOINT_REQUESTS = 4000


@dataclass(frozen=True)
class WorkloadModel:
    rate: float  # requests/s the plan is sized for
    inputs: Lengths
    outputs: Lengths
    arrival: api.ArrivalProcess = api.ArrivalProcess.POISSON
    cv: float = 1.0
    trace: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class PlanInput:
    architecture: ModelArchitecture
    device: DeviceSpec
    links: Links
    latency: LatencyModel
    slo: SloTargets
    workload: WorkloadModel
    cluster: ClusterShape
    affinity: api.Affinity = api.Affinity.AUTO
    seed: int = 0
    n_requests: int = 300
    top_candidates: int = 5
    # Engine limits simulated here and written into the plan for the workers (spec.engine).
    token_budget: int = DEFAULT_TOKEN_BUDGET
    max_batch: int | None = None  # sequences per decode step; None: the device's default
    pin: Pin | None = None  # spec.planner.pin: evaluate this instead of choosing
    method: str = "goodput"  # or "paper": exhaustive 1:1 pairs (the benchmark's same-run baseline)
    # The colocated baseline may run on another engine's profile (the paper scores vLLM with its own).
    colocated_latency: LatencyModel | None = None
    # spec.serving.mode: Auto deploys colocated instances when disaggregation does not pay (mode.py).
    serving_mode: api.ServingMode = api.ServingMode.DISAGGREGATED
    assumptions: dict[str, object] = field(default_factory=dict, compare=False)


def plan(
    inp: PlanInput, progress: Progress | None = None, clock: Callable[[], float] = time.perf_counter
) -> PlanReport:
    started = clock()
    w = inp.workload
    requests = generate(
        inp.n_requests, inp.seed, w.inputs, w.outputs, w.arrival, w.cv, list(w.trace) if w.trace else None
    )
    ctx = Context(
        inp.architecture,
        inp.device,
        inp.links,
        inp.latency,
        inp.slo,
        requests,
        inp.token_budget,
        progress,
        max_batch=decode_max_batch(inp),
    )
    shape = inp.cluster
    if inp.pin is not None:
        pinning.check(inp.pin, ctx, shape.gpus_per_node)  # before any search: refuse it at once
    rate = w.rate if w.rate > 0 else 1.0  # an idle deployment is sized for a trickle

    if inp.method == "paper":
        return _paper_report(inp, ctx, shape, rate, started, clock)

    affinity, why = choose_affinity(inp)
    high: list[Placement] = []
    low: list[Placement] = []
    seen: list[PhaseResult] = []
    if affinity in ("High", "Auto"):
        high, s = high_affinity(ctx, shape, rate)
        seen += s
    if affinity in ("Low", "Auto"):
        low, s = low_affinity(ctx, shape, rate)
        seen += s
    if affinity == "Auto":
        best_high = high[0].per_gpu if high else 0.0
        best_low = low[0].per_gpu if low else 0.0
        affinity = "High" if best_high >= best_low else "Low"
        why += f"; High gives {best_high:.2f}, Low {best_low:.2f} req/s per GPU"
    plans = high if affinity == "High" else low
    coloc = colocated(_colocated_context(inp, ctx), shape)
    seen += coloc
    estimate = None
    if plans:
        chosen, estimate, note = joint_check(inp, ctx, plans[0], rate)
        plans = [chosen, *plans[1:]]
        if note:
            why += f"; {note}"
    own = plans[0] if plans else None
    if inp.pin is not None:
        # The pin is what runs: first in the report, simulated at the workload's rate as it is
        # (no replicas added), with the planner's own choice kept for the comparison.
        pinned = pinning.placement(inp.pin, ctx, shape, inp.affinity)
        estimate = simulate_plan(inp, ctx, pinned, rate, capped=False)
        plans = [pinned, *(p for p in plans if not _same_plan(p, pinned))]
        affinity, why = pinned.affinity, f"spec.planner.pin, placed with {pinned.affinity} node affinity"
    lead = plans[0] if plans else None
    served = (
        lead.per_gpu if lead is not None and lead.prefill.max_rate > 0 and lead.decode.max_rate > 0 else None
    )
    decision = decide_mode(inp.serving_mode, served, coloc, pinned=inp.pin is not None)
    elapsed = clock() - started
    return build_report(
        inp=inp,
        ctx=ctx,
        affinity=affinity,
        affinity_reason=why,
        plans=plans,
        colocated=coloc,
        seen=seen,
        rate=rate,
        estimate=estimate,
        search_seconds=elapsed,
        own=own if inp.pin is not None else None,
        mode=decision,
    )


def decode_max_batch(inp: PlanInput) -> int:
    """The decode batch limit simulated (and written into the plan): the spec's, else the device's."""
    return inp.max_batch or inp.device.decode_max_batch


def _same_plan(a: Placement, b: Placement) -> bool:
    def shape(p: Placement) -> tuple[int, ...]:
        return (p.prefill.tp, p.prefill.pp, p.prefill_replicas, p.decode.tp, p.decode.pp, p.decode_replicas)

    return shape(a) == shape(b)


def choose_affinity(inp: PlanInput) -> tuple[str, str]:
    """Auto: one node needs no cross-node traffic (High); otherwise both algorithms run and the
    better goodput per GPU wins, which is where the inter-node bandwidth decides."""
    if inp.affinity is api.Affinity.HIGH:
        return "High", "placement.affinity High"
    if inp.affinity is api.Affinity.LOW:
        return "Low", "placement.affinity Low"
    if inp.cluster.budget <= inp.cluster.gpus_per_node:
        return "High", "Auto: the whole budget fits in one node, so every link is NVLink"
    return "Auto", f"Auto: {inp.links.inter_node / 1e9:.0f} GB/s between nodes, both placements simulated"


MAX_JOINT_BUMPS = 4


def joint_check(
    inp: PlanInput, ctx: Context, chosen: Placement, rate: float
) -> tuple[Placement, sim.Outcome, str]:
    """Phases were sized apart, each to the attainment target; a request must meet both SLOs, so
    the whole plan is simulated at the workload's rate and, while it misses the target and the
    budget allows, the phase missing its own SLO more often gets one more replica."""
    slo = inp.slo
    outcome = simulate_plan(inp, ctx, chosen, rate)
    added = {"prefill": 0, "decode": 0}
    for _ in range(MAX_JOINT_BUMPS):
        meets = outcome.attainment(slo.ttft_ms, slo.tpot_ms) >= slo.attainment
        if (meets and outcome.prefill_memory_peak <= 1) or not chosen.serves(rate):
            break
        ttft_ok = sim.attainment(outcome.ttft, slo.ttft_ms)
        tpot_ok = sim.attainment(outcome.tpot, slo.tpot_ms)
        # Overflowing prefill memory means decode drains too slowly: decode gets the replica.
        phase = "prefill" if meets is False and ttft_ok <= tpot_ok else "decode"
        if phase == "prefill":
            bigger = replace(chosen, prefill_replicas=chosen.prefill_replicas + 1)
        else:
            bigger = replace(chosen, decode_replicas=chosen.decode_replicas + 1)
        if bigger.gpus > inp.cluster.budget or chosen.affinity == "Low":
            break  # Low affinity grows by whole node groups; the search already sized those
        chosen, outcome = bigger, simulate_plan(inp, ctx, bigger, rate)
        added[phase] += 1
    note = ", ".join(f"joint check added {n} {phase} replica(s)" for phase, n in added.items() if n)
    return chosen, outcome, note


def simulate_plan(
    inp: PlanInput, ctx: Context, p: Placement, rate: float, *, capped: bool = True
) -> sim.Outcome:
    """The joint check: the chosen replicas together at the workload's rate (or, `capped`, the
    plan's goodput when the budget cannot reach that rate), every instance seeing about n_requests
    requests, with the engine limits the workers will run."""
    n = min(MAX_JOINT_REQUESTS, inp.n_requests * max(p.prefill_replicas, p.decode_replicas))
    w = inp.workload
    reqs = generate(n, inp.seed + 1, w.inputs, w.outputs, w.arrival, w.cv, list(w.trace) if w.trace else None)
    links = inp.links
    low = p.affinity == "Low"
    one_node = inp.cluster.budget <= inp.cluster.gpus_per_node
    transfer_bw = links.intra_node if low or one_node else links.inter_node
    if low:
        p_bw = d_bw = links.inter_node if p.node_span > 1 else links.intra_node
    else:
        p_bw = stage_link(links, inp.cluster, p.prefill.gpus)
        d_bw = stage_link(links, inp.cluster, p.decode.gpus)
    pt = inp.latency.instance(p.prefill.tp, p.prefill.pp, *stage_hop(inp.architecture, p_bw, inp.device))
    dt = inp.latency.instance(p.decode.tp, p.decode.pp, *stage_hop(inp.architecture, d_bw, inp.device))
    assert pt is not None and dt is not None  # the search only keeps configurations the model has
    # Paced by the splits the plan deploys (the search found them for these instances).
    pt, dt = with_stages(pt, prefill=p.prefill.split), with_stages(dt, decode=p.decode.split)
    arrivals = [t * 1e3 for t in reqs.arrivals(min(rate, p.goodput) if capped and p.goodput > 0 else rate)]
    gpus = p.decode.gpus
    return sim.simulate_disaggregated(
        [pt] * p.prefill_replicas,
        [dt] * p.decode_replicas,
        p.decode.fit.kv_tokens,
        lambda tokens: kv_transfer_ms(inp.architecture, tokens, transfer_bw, gpus),
        arrivals,
        reqs.inputs,
        reqs.outputs,
        ctx.token_budget,
        p.prefill.fit.kv_tokens,
        ctx.max_batch,
    )


def colocated_outcome(
    timing: InstanceTiming,
    kv_tokens: int,
    replicas: int,
    arrivals: list[float],
    reqs: Requests,
    budget: int,
    max_batch: int,
    scheduling: sim.ColocatedScheduling = sim.ColocatedScheduling.WORKER,
) -> sim.Outcome:
    """`replicas` colocated instances taking the requests in turn (the router's round robin)."""
    first_all, last_all = [0.0] * len(reqs), [0.0] * len(reqs)
    for k in range(replicas):
        idx = list(range(k, len(reqs), replicas))
        f, la = sim.simulate_colocated(
            timing,
            [arrivals[i] for i in idx],
            [reqs.inputs[i] for i in idx],
            [reqs.outputs[i] for i in idx],
            kv_tokens,
            budget,
            max_batch,
            scheduling,
        )
        for i, a, b in zip(idx, f, la, strict=True):
            first_all[i], last_all[i] = a, b
    return sim.Outcome(
        [f - a for f, a in zip(first_all, arrivals, strict=True)], sim.tpot(first_all, last_all, reqs.outputs)
    )


def simulate_colocated_plan(
    inp: PlanInput, ctx: Context, r: PhaseResult, replicas: int, rate: float
) -> sim.Outcome:
    """The colocated instances a plan deploys, together at the workload's rate (like `simulate_plan`)."""
    n = min(MAX_JOINT_REQUESTS, inp.n_requests * replicas)
    w = inp.workload
    reqs = generate(n, inp.seed + 1, w.inputs, w.outputs, w.arrival, w.cv, list(w.trace) if w.trace else None)
    model = inp.colocated_latency or inp.latency
    timing = model.instance(r.tp, r.pp, *stage_hop(inp.architecture, inp.links.intra_node, inp.device))
    assert timing is not None  # the search scored this shape
    arrivals = [t * 1e3 for t in reqs.arrivals(rate)]
    return colocated_outcome(
        timing,
        r.fit.kv_tokens,
        replicas,
        arrivals,
        reqs,
        ctx.token_budget,
        ctx.max_batch,
        colocated_scheduling(inp),
    )


def _paper_report(
    inp: PlanInput, ctx: Context, shape: ClusterShape, rate: float, started: float, clock: Callable[[], float]
) -> PlanReport:
    pairs = exhaustive_one_to_one(ctx, shape)
    plans = [Placement(p, d, 1, 1) for _, p, d in pairs if p.max_rate > 0]
    coloc = colocated(_colocated_context(inp, ctx), shape)
    return build_report(
        inp=inp,
        ctx=ctx,
        affinity="High",
        affinity_reason="paper method: fixed 1:1 ratio",
        plans=plans,
        colocated=coloc,
        seen=coloc,
        rate=rate,
        estimate=None,
        search_seconds=clock() - started,
        fixed_ratio=True,
    )


def colocated_scheduling(inp: PlanInput) -> sim.ColocatedScheduling:
    """How the colocated baseline orders prefills and decode steps. Ours by default: mode Auto and
    Colocated deploy `distserve worker colocated`, so the planner must assume what that worker does
    (one FIFO forward thread). Scored on another engine's profile (`--colocated-profile`, the
    paper's vLLM baseline) the baseline is that engine, latencies and scheduler alike: vLLM's
    prefill-first, as the paper's simulator scores it."""
    if inp.colocated_latency is None:
        return sim.ColocatedScheduling.WORKER
    return sim.ColocatedScheduling.PREFILL_FIRST


def _colocated_context(inp: PlanInput, ctx: Context) -> Context:
    if inp.colocated_latency is None:
        return ctx
    other = replace(
        ctx, latency=inp.colocated_latency, cache={}, colocated_scheduling=colocated_scheduling(inp)
    )
    other.probes = 0
    return other


def simulate_configuration(
    inp: PlanInput,
    rate: float,
    prefill: PhaseChoice | None = None,
    decode: PhaseChoice | None = None,
    colocated_choice: PhaseChoice | None = None,
) -> dict[str, object]:
    """`distserve simulate`: one configuration at one rate; ValueError when it cannot run."""
    w = inp.workload
    reqs = generate(
        inp.n_requests, inp.seed, w.inputs, w.outputs, w.arrival, w.cv, list(w.trace) if w.trace else None
    )
    budget, max_batch = inp.token_budget, decode_max_batch(inp)
    arch, links = inp.architecture, inp.links
    arrivals = [t * 1e3 for t in reqs.arrivals(rate)]
    slo = inp.slo
    longest = max(i + o for i, o in zip(reqs.inputs, reqs.outputs, strict=True))

    def instance(c: PhaseChoice, model: LatencyModel) -> tuple[InstanceTiming, Fit]:
        fit = check_fit(arch, inp.device, c.tp, c.pp, longest)
        timing = model.instance(c.tp, c.pp, *stage_hop(arch, links.intra_node, inp.device))
        if not fit.ok or timing is None:
            raise ValueError(f"TP{c.tp}xPP{c.pp} cannot run: {fit.reason or model.missing_reason}")
        return timing, fit

    if colocated_choice is not None:
        timing, fit = instance(colocated_choice, inp.colocated_latency or inp.latency)
        n = colocated_choice.replicas
        outcome = colocated_outcome(
            timing, fit.kv_tokens, n, arrivals, reqs, budget, max_batch, colocated_scheduling(inp)
        )
        gpus = colocated_choice.tp * colocated_choice.pp * n
        config = f"colocated TP{colocated_choice.tp}xPP{colocated_choice.pp} ×{n}"
    else:
        if prefill is None or decode is None:
            raise ValueError("give both --prefill and --decode, or --colocated")
        pt, _ = instance(prefill, inp.latency)
        dt, dfit = instance(decode, inp.latency)
        # The splits the plan would deploy; decode balanced for the largest batch memory and the
        # engine's limit allow (no SLO search here).
        running = min(max_batch, max(1, int(dfit.kv_tokens // (reqs.mean_input + reqs.mean_output))))
        pt = with_stages(pt, prefill=prefill_stages(arch, reqs, prefill.pp))
        dt = with_stages(dt, decode=decode_stages(arch, reqs, decode.pp, running))
        one_node = inp.cluster.budget <= inp.cluster.gpus_per_node
        bw = links.intra_node if one_node else links.inter_node
        gp = decode.tp * decode.pp
        outcome = sim.simulate_disaggregated(
            [pt] * prefill.replicas,
            [dt] * decode.replicas,
            dfit.kv_tokens,
            lambda tokens: kv_transfer_ms(arch, tokens, bw, gp),
            arrivals,
            reqs.inputs,
            reqs.outputs,
            budget,
            max_batch=max_batch,
        )
        gpus = prefill.tp * prefill.pp * prefill.replicas + decode.tp * decode.pp * decode.replicas
        config = (
            f"prefill TP{prefill.tp}xPP{prefill.pp} ×{prefill.replicas} | "
            f"decode TP{decode.tp}xPP{decode.pp} ×{decode.replicas}"
        )
    return {
        "configuration": config,
        "gpus": gpus,
        "requestsPerSecond": rate,
        "requests": len(reqs),
        "attainmentPercent": round(100 * outcome.attainment(slo.ttft_ms, slo.tpot_ms), 2),
        "ttftAttainmentPercent": round(100 * sim.attainment(outcome.ttft, slo.ttft_ms), 2),
        "tpotAttainmentPercent": round(100 * sim.attainment(outcome.tpot, slo.tpot_ms), 2),
        "ttftMillis": {
            p: round(sim.percentile(outcome.ttft, q), 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "tpotMillis": {
            p: round(sim.percentile(outcome.tpot, q), 2) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "waitedForDecodeMemory": outcome.memory_bound,
        "profile": (inp.colocated_latency or inp.latency).describe
        if colocated_choice
        else inp.latency.describe,
    }
