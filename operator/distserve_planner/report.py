"""The planner's answer: `PlanReport` (status object, JSON for the CLI, a table for people)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distserve_operator import api
from distserve_operator.api.limits import MIN_DECODE_KV_TOKENS

from . import simulator as sim
from .pin import comparison
from .placement import Placement, layers_text, summary

if TYPE_CHECKING:
    from .core import PlanInput
    from .mode import ModeDecision
    from .search import Context, PhaseResult


@dataclass
class PlanReport:
    status: api.PlanStatus
    search_seconds: float
    assumptions: dict[str, Any] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # "prefill TP1xPP1: reason"
    skipped: list[str] = field(default_factory=list)  # "TP3 does not divide ...": never scored
    phase_results: list[PhaseResult] = field(default_factory=list)
    probes: int = 0
    # The plans behind status.candidates, in that order (the first is the plan): what
    # `distserve plan --plot` simulates again at other rates.
    placements: list[Placement] = field(default_factory=list)

    @property
    def plan(self) -> api.PlanStatus:
        return self.status

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.status.to_wire(),
            "searchSeconds": round(self.search_seconds, 4),
            "assumptions": self.assumptions,
            "rejected": self.rejected,
            "skipped": self.skipped,
            "probes": self.probes,
        }

    def table(self) -> str:
        return format_table(self)


def _phase(r: PhaseResult, n: int) -> api.PhasePlan:
    return api.PhasePlan(
        tp=r.tp, pp=r.pp, replicas=n, max_rate_per_instance=round(r.max_rate, 4), stage_layers=r.stage_layers
    )


def engine_limits(ctx: Context, decode: PhaseResult | None) -> api.EngineLimits:
    """The limits the simulation ran with, for the workers: the token budget and batch limit of
    the context, and the KV capacity of the decode configuration's memory fit."""
    kv = decode.fit.kv_tokens if decode is not None else 0
    return api.EngineLimits(
        prefill_token_budget=ctx.token_budget,
        decode_max_batch=ctx.max_batch,
        decode_kv_tokens=max(MIN_DECODE_KV_TOKENS, kv),
    )


def colocated_limits(ctx: Context, r: PhaseResult) -> api.EngineLimits:
    """A colocated instance's limits: the context's, with the KV capacity of its own memory fit."""
    return engine_limits(ctx, r)


def colocated_replicas(r: PhaseResult, rate: float, budget: int) -> int:
    """Instances of a colocated shape serving `rate` within `budget` GPUs (one when it serves none)."""
    if r.max_rate <= 0:
        return 1
    return min(max(1, math.ceil(rate / r.max_rate - 1e-9)), max(1, budget // r.gpus))


def colocated_plan(ctx: Context, r: PhaseResult, rate: float, budget: int) -> api.ColocatedPlan:
    return api.ColocatedPlan(
        tp=r.tp,
        pp=r.pp,
        replicas=colocated_replicas(r, rate, budget),
        goodput_per_gpu=round(r.per_gpu, 4),
        max_rate_per_instance=round(r.max_rate, 4),
        limits=colocated_limits(ctx, r),
    )


def _candidate(p: Placement, attainment: float | None) -> api.Candidate:
    return api.Candidate(
        prefill=_phase(p.prefill, p.prefill_replicas),
        decode=_phase(p.decode, p.decode_replicas),
        gpus=p.gpus,
        goodput_per_gpu=round(p.per_gpu, 4),
        bottleneck=p.bottleneck,
        attainment_percent=attainment,
    )


def build_report(
    *,
    inp: PlanInput,
    ctx: Context,
    affinity: str,
    affinity_reason: str,
    plans: list[Placement],
    colocated: list[PhaseResult],
    seen: list[PhaseResult],
    rate: float,
    estimate: sim.Outcome | None,
    search_seconds: float,
    fixed_ratio: bool = False,
    own: Placement | None = None,
    mode: ModeDecision | None = None,
    attainments: dict[int, float] | None = None,
    choice_reason: str = "",
    colocated_estimate: sim.Outcome | None = None,
) -> PlanReport:
    """`plans[0]` is the plan (the pin, when spec.planner.pin is set; `own` is then the planner's
    own choice, for the comparison); `mode` the serving mode decided (mode.py), by default
    Disaggregated. Formatting only: `attainments` (by `id` of a plan) and `colocated_estimate` are
    the whole-plan simulations the core ran; `choice_reason` says why `plans[0]` won."""
    attainments = attainments or {}
    pinned = inp.pin is not None and bool(plans)
    slo = inp.slo
    budget = inp.cluster.budget
    best_coloc = next((c for c in colocated if c.max_rate > 0), None)
    coloc_plan = None
    if best_coloc is not None:
        coloc_plan = colocated_plan(ctx, best_coloc, rate, budget)
    candidates: list[api.Candidate] = []
    own_candidate = None
    shown = plans[: inp.top_candidates]
    for p in [*shown, *([own] if own is not None and own not in shown else [])]:
        candidate = _candidate(p, attainments.get(id(p)))
        if p is own:
            own_candidate = candidate
        if p in shown:
            candidates.append(candidate)
    rejected = sorted({f"{r.phase} {r.label}: {r.reason}" for r in seen if r.max_rate <= 0 and r.reason})
    skipped = [reason for _, reason in sorted(ctx.skipped.items())]
    slo_text = f"TTFT {slo.ttft_ms:.0f} ms and TPOT {slo.tpot_ms:.0f} ms for {slo.attainment:.0%} of requests"
    if plans:
        chosen = plans[0]
        est = api.Estimate(
            goodput_per_gpu=round(chosen.per_gpu, 4),
            goodput=round(chosen.goodput, 4),
            attainment_percent=round(100 * estimate.attainment(slo.ttft_ms, slo.tpot_ms), 2)
            if estimate
            else None,
            ttft_p90_millis=round(sim.percentile(estimate.ttft, 90), 2) if estimate else None,
            tpot_p90_millis=round(sim.percentile(estimate.tpot, 90), 2) if estimate else None,
        )
        pays = None if coloc_plan is None else chosen.per_gpu > best_coloc.per_gpu if best_coloc else None
        verdict = _verdict(chosen, best_coloc, rate, slo_text, pinned)
        if choice_reason:
            verdict += f" Chosen: {choice_reason}."
        if pinned:
            verdict = f"{comparison(chosen, own, rate)} {verdict}"
        if estimate is not None and estimate.prefill_memory_peak > 1:
            verdict += (
                f" Requests waiting for decode room would need {estimate.prefill_memory_peak:.0%} of a prefill "
                "instance's KV memory: backpressure will delay prefills; more decode replicas would help."
            )
        status = api.PlanStatus(
            prefill=_phase(chosen.prefill, chosen.prefill_replicas),
            decode=_phase(chosen.decode, chosen.decode_replicas),
            affinity=api.PlacementAffinity(chosen.affinity if not fixed_ratio else "High"),
            node_span=chosen.node_span,
            gpus=chosen.gpus,
            summary=summary(chosen),
            estimated=est,
            bottleneck=chosen.bottleneck,
            # A pin is deployed whatever it scores; it is feasible when both phases meet their SLO
            # at some rate (the search only keeps plans that do).
            feasible=chosen.prefill.max_rate > 0 and chosen.decode.max_rate > 0,
            candidates=candidates,
            colocated=coloc_plan,
            disaggregation_pays=pays,
            verdict=verdict,
            profile=inp.latency.describe,
            search_seconds=round(search_seconds, 4),
            limits=engine_limits(ctx, chosen.decode),
            pinned=pinned,
            planner_choice=own_candidate,
        )
    else:
        status = _infeasible(inp, ctx, seen, affinity, coloc_plan, slo_text, search_seconds)
    if mode is not None:
        status = with_mode(status, mode, inp, ctx, rate, colocated_estimate)
    assumptions = {
        **inp.assumptions,
        "requestsPerSecond": rate,
        "simulatedRequests": inp.n_requests,
        "seed": inp.seed,
        "meanInputTokens": round(ctx.requests.mean_input, 1),
        "meanOutputTokens": round(ctx.requests.mean_output, 1),
        "prefillTokenBudget": ctx.token_budget,
        "decodeMaxBatch": ctx.max_batch,
        "affinityReason": affinity_reason,
        "choice": choice_reason,
        "model": inp.architecture.name,
        "architectureSource": inp.architecture.source,
        "device": inp.device.name,
        "kvBytesPerToken": inp.architecture.kv_bytes_per_token,
        "weightBytes": inp.architecture.weight_bytes,
    }
    return PlanReport(status, search_seconds, assumptions, rejected, skipped, seen, ctx.probes, shown)


def with_mode(
    status: api.PlanStatus,
    mode: ModeDecision,
    inp: PlanInput,
    ctx: Context,
    rate: float,
    outcome: sim.Outcome | None = None,
) -> api.PlanStatus:
    """The plan in the decided serving mode. Colocated: the colocated instances become what runs
    (shape, replicas, GPUs, estimate, limits, summary); prefill and decode stay, as the
    disaggregated alternative (`outcome`: the colocated instances simulated together). Unless the
    spec asked for Disaggregated, the verdict leads with why."""

    update: dict[str, Any] = {"mode": mode.mode, "mode_reason": mode.reason}
    r = mode.colocated
    if inp.serving_mode is not api.ServingMode.DISAGGREGATED:
        verdict = status.verdict
        if r is not None:  # the verdict was written of the disaggregated plan, now the alternative
            verdict = verdict.replace("; consider a colocated deployment.", ".").replace(
                "The plan is limited first by", "The disaggregated plan would be limited first by"
            )
        update["verdict"] = f"Mode {mode.mode.value}: {mode.reason}. {verdict}"
    if mode.mode is api.PlanMode.COLOCATED and r is not None and outcome is not None:
        slo = inp.slo
        coloc = colocated_plan(ctx, r, rate, inp.cluster.budget)
        update |= {
            "colocated": coloc,
            "gpus": coloc.gpus,
            "summary": f"colocated {r.label} ×{coloc.replicas}",
            "estimated": api.Estimate(
                goodput_per_gpu=round(r.per_gpu, 4),
                goodput=round(coloc.replicas * r.max_rate, 4),
                attainment_percent=round(100 * outcome.attainment(slo.ttft_ms, slo.tpot_ms), 2),
                ttft_p90_millis=round(sim.percentile(outcome.ttft, 90), 2),
                tpot_p90_millis=round(sim.percentile(outcome.tpot, 90), 2),
            ),
            "bottleneck": r.bottleneck,
            "feasible": r.max_rate > 0,
            "limits": coloc.limits,
        }
    return status.model_copy(update=update)


def _verdict(
    chosen: Placement, coloc: PhaseResult | None, rate: float, slo_text: str, pinned: bool = False
) -> str:
    parts = []
    if pinned and chosen.per_gpu <= 0:
        worst = chosen.prefill if chosen.prefill.max_rate <= 0 else chosen.decode
        parts.append(
            f"The pinned {worst.phase} {worst.label} meets no SLO at any rate ({worst.reason}); expect misses."
        )
    elif not chosen.serves(rate):
        fix = "raise spec.planner.pin replicas" if pinned else "raise cluster.maxGPUs/nodes"
        parts.append(
            f"The plan sustains only {chosen.goodput:.2f} of the {rate:g} req/s asked for with {slo_text}; "
            f"{fix} or expect misses."
        )
    if coloc is None:
        parts.append("Disaggregation pays: no colocated configuration meets the SLO at all.")
    else:
        gain = chosen.per_gpu / coloc.per_gpu - 1 if coloc.per_gpu > 0 else math.inf
        if gain > 0.05:
            parts.append(
                f"Disaggregation pays: {chosen.per_gpu:.2f} vs {coloc.per_gpu:.2f} req/s per GPU colocated "
                f"(TP{coloc.tp}xPP{coloc.pp}), {gain:+.0%}."
            )
        elif gain > 0:
            parts.append(
                f"Disaggregation pays marginally: {chosen.per_gpu:.2f} vs {coloc.per_gpu:.2f} req/s per GPU "
                f"colocated ({gain:+.0%}); colocated is simpler to run."
            )
        else:
            parts.append(
                f"Disaggregation does not pay: colocated TP{coloc.tp}xPP{coloc.pp} reaches {coloc.per_gpu:.2f} "
                f"req/s per GPU against {chosen.per_gpu:.2f}; consider a colocated deployment."
            )
    limit = {
        "TTFT": "prefill (TTFT)",
        "TPOT": "decode step time (TPOT)",
        "Memory": "decode KV memory",
        "Batch": "the decode batch limit (spec.engine.decodeMaxBatch)",
        "Transfer": "KV transfer",
    }.get(chosen.bottleneck.value, chosen.bottleneck.value)
    parts.append(f"The plan is limited first by {limit}.")
    return " ".join(parts)


def _closest(results: list[PhaseResult], phase: str) -> PhaseResult | None:
    pool = [r for r in results if r.phase == phase and r.fit.ok]
    return max(pool, key=lambda r: (r.max_rate, r.low_load_attainment), default=None)


def _infeasible(
    inp: PlanInput,
    ctx: Context,
    seen: list[PhaseResult],
    affinity: str,
    coloc_plan: api.ColocatedPlan | None,
    slo_text: str,
    search_seconds: float,
) -> api.PlanStatus:
    p, d = _closest(seen, "prefill"), _closest(seen, "decode")
    if p is None or d is None:
        bottleneck = api.Bottleneck.MEMORY
        why = "no (TP, PP) within the GPU budget holds the model and one request in memory"
        pp_plan = api.PhasePlan(tp=1, pp=1, replicas=0)
        dp_plan = pp_plan
    else:
        bottleneck = api.Bottleneck.TTFT if p.max_rate <= 0 else api.Bottleneck.TPOT
        worst = p if p.max_rate <= 0 else d
        why = f"the closest candidate, {worst.phase} {worst.label}, fails: {worst.reason}"
        pp_plan, dp_plan = _phase(p, 1), _phase(d, 1)
    fix = {
        api.Bottleneck.TTFT: "raise slo.ttftMillis, shorten prompts, or use faster GPUs",
        api.Bottleneck.TPOT: "raise slo.tpotMillis or use GPUs with more memory bandwidth",
        api.Bottleneck.MEMORY: "raise cluster.maxGPUs/nodes, use GPUs with more memory, or a smaller dtype",
    }[bottleneck]
    verdict = f"No configuration meets {slo_text}: {why}. Fix: {fix}."
    if coloc_plan is not None:
        verdict += f" A colocated TP{coloc_plan.tp}xPP{coloc_plan.pp} does meet it."
    return api.PlanStatus(
        prefill=pp_plan,
        decode=dp_plan,
        affinity=api.PlacementAffinity("Low" if affinity == "Low" else "High"),
        node_span=1,
        gpus=pp_plan.gpus + dp_plan.gpus,
        summary="infeasible: " + why,
        estimated=api.Estimate(goodput_per_gpu=0.0, goodput=0.0),
        bottleneck=bottleneck,
        feasible=False,
        colocated=coloc_plan,
        disaggregation_pays=None,
        verdict=verdict,
        profile=inp.latency.describe,
        search_seconds=round(search_seconds, 4),
        limits=engine_limits(ctx, d),
    )


def format_table(report: PlanReport) -> str:
    s, a = report.status, report.assumptions
    lines = [
        f"Plan for {a.get('model')} on {a.get('device')} ({s.affinity.value} node affinity"
        + (f", pipelines span {s.node_span} nodes" if s.node_span > 1 else "")
        + ")",
        f"  workload   {a.get('requestsPerSecond'):g} req/s, mean input {a.get('meanInputTokens')} / output "
        f"{a.get('meanOutputTokens')} tokens, {a.get('simulatedRequests')} simulated requests (seed {a.get('seed')})",
        f"  latency    {s.profile}",
        f"  mode       {s.mode.value}" + (f": {s.mode_reason}" if s.mode_reason else ""),
        "",
    ]
    colocated = s.mode is api.PlanMode.COLOCATED and s.colocated is not None
    if colocated and s.colocated is not None:
        c0 = s.colocated
        lines.append(
            f"  {'colocated':<9} TP{c0.tp} PP{c0.pp} × {c0.replicas:<3} {c0.max_rate_per_instance or 0:8.2f} req/s "
            "per instance (prefill and decode in each)" + layers_text(c0.stage_layers)
        )
    if s.feasible or s.pinned or colocated:
        if s.pinned:
            lines.append("  pinned by spec.planner.pin (evaluated, not chosen)")
        # Colocated: the disaggregated alternative (when there is one), not what runs.
        alternative = [] if colocated and not s.candidates else [("prefill", s.prefill), ("decode", s.decode)]
        for name, ph in alternative:
            if colocated:
                name = f"(alt) {name}"
            lines.append(
                f"  {name:<8} TP{ph.tp} PP{ph.pp} × {ph.replicas:<3} {ph.max_rate_per_instance or 0:8.2f} req/s per instance"
                + layers_text(ph.stage_layers)
            )
        e = s.estimated
        lines.append(
            f"  GPUs {s.gpus}   goodput {e.goodput or 0:.2f} req/s = {e.goodput_per_gpu:.2f} req/s per GPU   "
            f"bottleneck {s.bottleneck.value}"
        )
        if e.attainment_percent is not None:
            lines.append(
                f"  at {a.get('requestsPerSecond'):g} req/s: attainment {e.attainment_percent:.1f}%, "
                f"p90 TTFT {e.ttft_p90_millis:.0f} ms, p90 TPOT {e.tpot_p90_millis:.1f} ms"
            )
    else:
        lines.append(f"  INFEASIBLE  {s.summary}")
    if s.limits is not None:
        lim = s.limits
        lines.append(
            f"  engine     prefill token budget {lim.prefill_token_budget}, decode max batch "
            f"{lim.decode_max_batch}, decode KV {lim.decode_kv_tokens:,} tokens per instance"
        )
    if s.candidates:
        lines += ["", "  #  prefill         decode          GPUs  req/s/GPU  attain   bound"]
        for i, c in enumerate(s.candidates, 1):
            att = f"{c.attainment_percent:5.1f}%" if c.attainment_percent is not None else "    - "
            lines.append(
                f"  {i:<2} TP{c.prefill.tp}xPP{c.prefill.pp} ×{c.prefill.replicas:<5} "
                f"TP{c.decode.tp}xPP{c.decode.pp} ×{c.decode.replicas:<5} {c.gpus:>4}  {c.goodput_per_gpu:9.2f}  "
                f"{att}  {c.bottleneck.value}"
            )
    if s.planner_choice is not None:
        c = s.planner_choice
        lines.append(
            f"\n  planner's own choice: TP{c.prefill.tp}xPP{c.prefill.pp} ×{c.prefill.replicas} | "
            f"TP{c.decode.tp}xPP{c.decode.pp} ×{c.decode.replicas}, {c.gpus} GPUs, "
            f"{c.goodput_per_gpu:.2f} req/s per GPU"
        )
    if s.colocated is not None and not colocated:
        c2 = s.colocated
        lines.append(
            f"\n  colocated best: TP{c2.tp}xPP{c2.pp} × {c2.replicas}, {c2.goodput_per_gpu:.2f} req/s per GPU"
        )
    lines += ["", "  verdict: " + s.verdict]
    if report.rejected:
        lines.append(
            f"  rejected ({len(report.rejected)}): "
            + "; ".join(report.rejected[:6])
            + (" ..." if len(report.rejected) > 6 else "")
        )
    if report.skipped:
        lines.append(f"  skipped, cannot shard ({len(report.skipped)}): " + "; ".join(report.skipped))
    lines.append(f"  search took {report.search_seconds:.2f} s ({report.probes} simulated probes)")
    return "\n".join(lines)
