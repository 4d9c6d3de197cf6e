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
from .mode import ModeDecision
from .mode import decide as decide_mode
from .pin import PhaseChoice, Pin
from .placement import EQUIVALENT_SHARE, Choice, Placement, choose, high_affinity, low_affinity
from .report import PlanReport, build_report, colocated_replicas
from .search import (
    ClusterShape,
    Context,
    PhaseResult,
    Progress,
    SloTargets,
    colocated,
    decode_stages,
    exhaustive_one_to_one,
    prefill_stages,
    timing_of,
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
    ctx = context(inp, progress)
    shape = inp.cluster
    if inp.pin is not None:
        pinning.check(inp.pin, ctx, shape.gpus_per_node)  # before any search: refuse it at once
    rate = w.rate if w.rate > 0 else 1.0  # an idle deployment is sized for a trickle

    if inp.method == "paper":
        return _paper_report(inp, ctx, shape, rate, started, clock)

    affinity, why = choose_affinity(inp)
    outcomes = Outcomes(inp, ctx, rate)
    found: list[Placement] = []
    seen: list[PhaseResult] = []
    best: dict[str, float] = {}
    for name, algorithm in (("High", high_affinity), ("Low", low_affinity)):
        if affinity in (name, "Auto"):
            plans_, seen_ = algorithm(ctx, shape, rate)
            found += plans_
            seen += seen_
            best[name] = max((p.per_gpu for p in plans_), default=0.0)
    choice = select(inp, outcomes, found, rate)
    plans = choice.plans
    if affinity == "Auto":
        affinity = plans[0].affinity if plans else "High"
        why += f"; High gives {best['High']:.2f}, Low {best['Low']:.2f} req/s per GPU"
    coloc = colocated(_colocated_context(inp, ctx), shape)
    seen += coloc
    estimate = None
    if plans:
        chosen, estimate, note = joint_check(inp, outcomes, plans[0], rate)
        plans = [chosen, *plans[1:]]
        if note:
            why += f"; {note}"
    own = plans[0] if plans else None
    if inp.pin is not None:
        # The pin is what runs: first in the report, simulated at the workload's rate as it is
        # (no replicas added), with the planner's own choice kept for the comparison.
        pinned = pinning.placement(inp.pin, ctx, shape, inp.affinity)
        estimate = simulate_plan(inp, ctx, pinned, rate, capped=False)
        plans = [pinned, *(p for p in plans if p.shape != pinned.shape)]
        affinity, why = pinned.affinity, f"spec.planner.pin, placed with {pinned.affinity} node affinity"
        choice = Choice(plans, "")
    lead = plans[0] if plans else None
    served = (
        lead.per_gpu if lead is not None and lead.prefill.max_rate > 0 and lead.decode.max_rate > 0 else None
    )
    decision = decide_mode(inp.serving_mode, served, coloc, pinned=inp.pin is not None)
    shown = plans[: inp.top_candidates] + ([own] if own is not None and inp.pin is not None else [])
    slo = inp.slo
    attainments = {}
    for p in shown:
        outcome = estimate if p is plans[0] and estimate is not None else outcomes.of(p)
        attainments[id(p)] = round(100 * outcome.attainment(slo.ttft_ms, slo.tpot_ms), 2)
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
        attainments=attainments,
        choice_reason=choice.reason,
        colocated_estimate=_colocated_estimate(inp, ctx, decision, rate),
    )


def context(inp: PlanInput, progress: Progress | None = None) -> Context:
    """The search's context: the workload's requests (seeded) and the engine limits simulated."""
    w = inp.workload
    requests = generate(
        inp.n_requests, inp.seed, w.inputs, w.outputs, w.arrival, w.cv, list(w.trace) if w.trace else None
    )
    return Context(
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


# Whole plans simulated, at most, to find the best that meets the SLOs jointly (`select`).
MAX_VERIFIED = 12


def select(inp: PlanInput, outcomes: Outcomes, plans: list[Placement], rate: float) -> Choice:
    """The plan to deploy. Each phase was sized on its own to the attainment target, but a request
    must meet both SLOs: plans are simulated whole, best per GPU first, and those that meet the
    target together compete (`placement.choose`, ties broken by TPOT p90 and GPUs). A plan rated
    higher per GPU that misses the target together is passed over, and the report says so. When
    none of the first `MAX_VERIFIED` meets it, the best is taken and `joint_check` grows it."""
    ranked = choose(plans, rate, outcomes.tpot_p90, tie=False).plans
    verified: list[Placement] = []
    missed = 0
    for p in ranked[:MAX_VERIFIED]:
        if p.serves(rate) != ranked[0].serves(rate):
            break  # a plan serving less of the rate never wins
        if verified and p.per_gpu < EQUIVALENT_SHARE * verified[0].per_gpu:
            break  # nothing further down can tie with the best that meets the target
        if outcomes.meets(p):
            verified.append(p)
        elif not verified:
            missed += 1
    if not verified:
        return choose(plans, rate, outcomes.tpot_p90)
    choice = choose(verified, rate, outcomes.tpot_p90)
    chosen = choice.plans[0]
    reason = choice.reason
    if missed:
        reason += (
            f"; {missed} plan(s) rated higher per GPU phase by phase miss the {inp.slo.attainment:.0%} "
            "attainment target when simulated whole"
        )
    return Choice([chosen, *(p for p in ranked if p is not chosen)], reason)


class Outcomes:
    """Whole-plan simulations, each run once: at the workload's rate (what a plan will see: the
    joint check, the report's candidates) and at a plan's own goodput (the tie between plans)."""

    def __init__(self, inp: PlanInput, ctx: Context, rate: float) -> None:
        self.inp, self.ctx, self.rate = inp, ctx, rate
        self.cache: dict[tuple[object, ...], sim.Outcome] = {}

    def of(self, p: Placement, rate: float | None = None) -> sim.Outcome:
        rate = self.rate if rate is None else rate
        key = (*p.shape, p.affinity, p.transfer_bw, p.prefill.stage_bw, p.decode.stage_bw, rate)
        if key not in self.cache:
            self.cache[key] = simulate_plan(self.inp, self.ctx, p, rate)
        return self.cache[key]

    def tpot_p90(self, p: Placement) -> float:
        """TPOT p90 at the plan's own goodput: plans compared at the load each is rated for, so a
        larger one does not win a tie by running emptier at the workload's rate."""
        return sim.percentile(self.of(p, p.goodput).tpot, 90)

    def meets(self, p: Placement) -> bool:
        """Whether the plan meets the attainment target as a whole, without backpressure."""
        o, slo = self.of(p), self.inp.slo
        return o.attainment(slo.ttft_ms, slo.tpot_ms) >= slo.attainment and o.prefill_memory_peak <= 1


def _colocated_estimate(
    inp: PlanInput, ctx: Context, decision: ModeDecision, rate: float
) -> sim.Outcome | None:
    """The colocated instances simulated together, when they are what runs."""
    r = decision.colocated
    if decision.mode is not api.PlanMode.COLOCATED or r is None:
        return None
    return simulate_colocated_plan(inp, ctx, r, colocated_replicas(r, rate, inp.cluster.budget), rate)


def decode_max_batch(inp: PlanInput) -> int:
    """The decode batch limit simulated (and written into the plan): the spec's, else the device's."""
    return inp.max_batch or inp.device.decode_max_batch


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
    inp: PlanInput, outcomes: Outcomes, chosen: Placement, rate: float
) -> tuple[Placement, sim.Outcome, str]:
    """Phases were sized apart, each to the attainment target; a request must meet both SLOs, so
    the whole plan is simulated at the workload's rate and, while it misses the target and the
    budget allows, the phase missing its own SLO more often gets one more replica."""
    slo = inp.slo
    outcome = outcomes.of(chosen)
    added = {"prefill": 0, "decode": 0}
    for _ in range(MAX_JOINT_BUMPS):
        meets = outcome.attainment(slo.ttft_ms, slo.tpot_ms) >= slo.attainment
        if (meets and outcome.prefill_memory_peak <= 1) or not chosen.serves(rate):
            break
        ttft_ok = sim.attainment(outcome.ttft, slo.ttft_ms)
        tpot_ok = sim.attainment(outcome.tpot, slo.tpot_ms)
        # Overflowing prefill memory means decode drains too slowly: decode gets the replica.
        phase = "prefill" if meets is False and ttft_ok <= tpot_ok else "decode"
        bigger = chosen.grown(phase, inp.cluster.gpus_per_node)
        if bigger is None or bigger.gpus > inp.cluster.budget:
            break
        chosen, outcome = bigger, outcomes.of(bigger)
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
    # Paced by the links and splits the search scored these instances with.
    pt, dt = timing_of(ctx, p.prefill), timing_of(ctx, p.decode)
    transfer_bw = p.transfer_bw or inp.links.intra_node
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


@dataclass(frozen=True)
class Simulated:
    """One configuration simulated at one rate (`distserve simulate`): the per-request latencies."""

    configuration: str
    gpus: int
    rate: float
    outcome: sim.Outcome
    profile: str

    def summary(self, slo: SloTargets) -> dict[str, object]:
        """The figures `distserve simulate` prints."""
        outcome = self.outcome
        return {
            "configuration": self.configuration,
            "gpus": self.gpus,
            "requestsPerSecond": self.rate,
            "requests": len(outcome.ttft),
            "attainmentPercent": round(100 * outcome.attainment(slo.ttft_ms, slo.tpot_ms), 2),
            "ttftAttainmentPercent": round(100 * sim.attainment(outcome.ttft, slo.ttft_ms), 2),
            "tpotAttainmentPercent": round(100 * sim.attainment(outcome.tpot, slo.tpot_ms), 2),
            "ttftMillis": {
                p: round(sim.percentile(outcome.ttft, q), 2)
                for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
            },
            "tpotMillis": {
                p: round(sim.percentile(outcome.tpot, q), 2)
                for p, q in (("p50", 50), ("p90", 90), ("p99", 99))
            },
            "waitedForDecodeMemory": outcome.memory_bound,
            "profile": self.profile,
        }


def simulate_configuration(
    inp: PlanInput,
    rate: float,
    prefill: PhaseChoice | None = None,
    decode: PhaseChoice | None = None,
    colocated_choice: PhaseChoice | None = None,
) -> Simulated:
    """`distserve simulate`: one configuration at one rate; ValueError when it cannot run."""
    w = inp.workload
    reqs = generate(
        inp.n_requests, inp.seed, w.inputs, w.outputs, w.arrival, w.cv, list(w.trace) if w.trace else None
    )
    budget, max_batch = inp.token_budget, decode_max_batch(inp)
    arch, links = inp.architecture, inp.links
    arrivals = [t * 1e3 for t in reqs.arrivals(rate)]
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
    profile = (inp.colocated_latency or inp.latency) if colocated_choice else inp.latency
    return Simulated(config, gpus, rate, outcome, profile.describe)
