"""SLO attainment against the request rate for the plans a report shows: what `distserve plan
--plot` draws (plots.py draws it; this module only computes, and imports no plotting library).

Each curve is one plan simulated whole, as the joint check simulates the chosen plan (`core.
simulate_plan`, uncapped: past its goodput the plan is overloaded and the curve shows it), at
request rates up to past the highest goodput. Rates are per GPU, so that plans of different sizes
compare on the paper's objective. A curve's marker is where it crosses the attainment target:
the plan's goodput per GPU measured whole. The report's figure (`goodput_per_gpu`) is found phase
by phase, each phase sized alone to the target, as the paper's search does. The whole plan may
cross elsewhere: below it, because a request must meet both SLOs at once; above it, when one
phase of an unbalanced plan has slack. The plot shows both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distserve_operator import api

from .core import PlanInput, context, simulate_colocated_plan, simulate_plan
from .placement import Placement
from .report import PlanReport
from .search import PhaseResult

POINTS = 14  # rates per curve (plus the workload's own)
SPAN = 1.5  # the axis reaches this much past the highest goodput (or the workload's rate) per GPU


@dataclass(frozen=True)
class Curve:
    label: str
    gpus: int
    goodput_per_gpu: float  # as the report prints it: where the planner has the plan meet the target
    points: tuple[tuple[float, float], ...]  # (requests/s per GPU, attainment %), in rate order
    chosen: bool = False
    colocated: bool = False
    target_percent: float = 90.0

    @property
    def crossing(self) -> float | None:
        """The rate per GPU where the curve first falls below the target (linear between the two
        points around it); None if it is below at the lowest rate or never falls in range."""
        previous: tuple[float, float] | None = None
        for x, y in self.points:
            if y < self.target_percent:
                if previous is None:
                    return None
                x0, y0 = previous
                return x0 + (x - x0) * (y0 - self.target_percent) / (y0 - y)
            previous = (x, y)
        return None


@dataclass(frozen=True)
class Curves:
    model: str
    device: str
    budget_gpus: int
    chosen_gpus: int  # 0 when no plan meets the SLO
    ttft_ms: float
    tpot_ms: float
    target_percent: float
    rate: float  # the workload's requests/s
    curves: tuple[Curve, ...]

    @property
    def workload_per_gpu(self) -> float | None:
        """The workload's rate on the chosen plan's GPUs (None without a plan)."""
        return self.rate / self.chosen_gpus if self.chosen_gpus else None


def attainment_curves(inp: PlanInput, report: PlanReport) -> Curves:
    """The candidates of `report` (planned from `inp`) and its colocated alternative, each
    simulated at rates from near zero to past its goodput."""
    status = report.status
    rate = float(report.assumptions.get("requestsPerSecond", inp.workload.rate) or 1.0)
    colocated_mode = status.mode is api.PlanMode.COLOCATED
    coloc, shown = _colocated_result(report), status.colocated
    goal = round(100 * inp.slo.attainment, 2)
    chosen_gpus = status.gpus if status.feasible or status.pinned or colocated_mode else 0
    goodputs = [round(p.per_gpu, 4) for p in report.placements]
    if coloc is not None and shown is not None:
        goodputs.append(shown.goodput_per_gpu)
    top = max([*goodputs, rate / chosen_gpus if chosen_gpus else 0.0], default=0.0)
    top = top or rate / max(1, inp.cluster.budget)
    grid = [SPAN * top * k / POINTS for k in range(1, POINTS + 1)]

    ctx = context(inp)
    slo = inp.slo
    curves: list[Curve] = []
    for i, p in enumerate(report.placements):

        def attain(total: float, p: Placement = p) -> float:
            return simulate_plan(inp, ctx, p, total, capped=False).attainment(slo.ttft_ms, slo.tpot_ms)

        curves.append(
            Curve(
                label=f"prefill {p.prefill.label} ×{p.prefill_replicas} + decode {p.decode.label} "
                f"×{p.decode_replicas}",
                gpus=p.gpus,
                goodput_per_gpu=round(p.per_gpu, 4),
                points=_points(attain, p.gpus, grid, rate),
                chosen=i == 0 and not colocated_mode,
                target_percent=goal,
            )
        )
    if coloc is not None and shown is not None:
        r, replicas = coloc, shown.replicas
        gpus = replicas * r.gpus

        def attain_colocated(total: float) -> float:
            outcome = simulate_colocated_plan(inp, ctx, r, replicas, total)
            return outcome.attainment(slo.ttft_ms, slo.tpot_ms)

        curves.append(
            Curve(
                label=f"colocated {r.label} ×{replicas}",
                gpus=gpus,
                goodput_per_gpu=shown.goodput_per_gpu,
                points=_points(attain_colocated, gpus, grid, rate),
                chosen=colocated_mode,
                colocated=True,
                target_percent=goal,
            )
        )
    return Curves(
        model=inp.architecture.name,
        device=inp.device.name,
        budget_gpus=inp.cluster.budget,
        chosen_gpus=chosen_gpus,
        ttft_ms=slo.ttft_ms,
        tpot_ms=slo.tpot_ms,
        target_percent=goal,
        rate=rate,
        curves=tuple(curves),
    )


def _points(
    attain: Callable[[float], float], gpus: int, grid: list[float], rate: float
) -> tuple[tuple[float, float], ...]:
    """Attainment at each per-GPU rate of `grid`, and at the workload's own rate, so that the
    curve passes through the attainment the report prints for the plan."""
    rates = sorted({*grid, rate / gpus}) if gpus else grid
    return tuple((x, round(100 * attain(x * gpus), 2)) for x in rates)


def _colocated_result(report: PlanReport) -> PhaseResult | None:
    """The colocated shape the report names (its best, or the one colocated mode deploys)."""
    c = report.status.colocated
    if c is None:
        return None
    return next(
        (
            r
            for r in report.phase_results
            if r.phase == "colocated" and (r.tp, r.pp) == (c.tp, c.pp) and r.max_rate > 0
        ),
        None,
    )
