"""Which serving mode a plan deploys: spec.serving.mode, and for Auto the planner's verdict.

Pure: from the requested mode, the disaggregated plan's goodput per GPU and the colocated search's
results to a `ModeDecision` (the mode, the colocated shape that would run, and why in words).

The colocated worker (`distserve worker colocated`) runs one process on one device: TP1, one
pipeline stage. The colocated search scores every (TP, PP) so the verdict compares disaggregation
with the best colocated engine there is; the mode that deploys colocated instances only picks a
shape the worker runs (`RUNNABLE_COLOCATED`), and says so when the best one is another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from distserve_operator import api

from .search import PhaseResult

# (tp, pp) shapes `distserve worker colocated` runs (colocated.py: one process, one device).
RUNNABLE_COLOCATED: Final = frozenset({(1, 1)})


@dataclass(frozen=True)
class ModeDecision:
    mode: api.PlanMode
    reason: str
    colocated: PhaseResult | None  # the colocated shape deployed (mode Colocated), else None


class ColocatedNotRunnable(ValueError):
    """spec.serving.mode Colocated, and no colocated shape the worker runs fits the model."""


def runnable(results: Sequence[PhaseResult]) -> PhaseResult | None:
    """The best colocated result the worker runs and whose model fits (its rate may be 0: it
    misses the SLO), or None."""
    fits = [r for r in results if (r.tp, r.pp) in RUNNABLE_COLOCATED and r.fit.ok]
    return max(fits, key=lambda r: (r.per_gpu, r.low_load_attainment), default=None)


def _shapes() -> str:
    return " or ".join(f"TP{tp}xPP{pp}" for tp, pp in sorted(RUNNABLE_COLOCATED))


def decide(
    requested: api.ServingMode,
    disaggregated_per_gpu: float | None,
    colocated: Sequence[PhaseResult],
    *,
    pinned: bool = False,
) -> ModeDecision:
    """`disaggregated_per_gpu`: the chosen disaggregated plan's goodput per GPU, None when no
    disaggregated plan meets the SLO; `colocated`: the colocated search's results (any order).
    ColocatedNotRunnable when Colocated is asked for and cannot run."""
    Mode = api.PlanMode
    if requested is api.ServingMode.DISAGGREGATED:
        return ModeDecision(Mode.DISAGGREGATED, "spec.serving.mode is Disaggregated", None)
    run = runnable(colocated)
    best = max((r for r in colocated if r.max_rate > 0), key=lambda r: r.per_gpu, default=None)
    if requested is api.ServingMode.COLOCATED:
        if run is None:
            why = next(
                (r.reason for r in colocated if (r.tp, r.pp) in RUNNABLE_COLOCATED and r.reason),
                "no colocated shape was scored",
            )
            raise ColocatedNotRunnable(
                f"spec.serving.mode Colocated: the colocated worker runs {_shapes()} only, and that does not "
                f"fit ({why}): set spec.serving.mode to Disaggregated or Auto"
            )
        reason = f"spec.serving.mode is Colocated: {run.label} instances"
        if run.max_rate <= 0:
            reason += f", though they miss the SLO ({run.reason or 'even at low load'})"
        return ModeDecision(Mode.COLOCATED, reason + _unrunnable_note(best), run)
    # Auto: a pin fixes a disaggregated plan; otherwise the higher goodput per GPU wins.
    if pinned:
        return ModeDecision(
            Mode.DISAGGREGATED, "spec.serving.mode Auto: spec.planner.pin fixes a disaggregated plan", None
        )
    if run is None or run.max_rate <= 0:
        why = "no colocated instance meets the SLO"
        if best is not None:
            fails = "does not fit in memory" if run is None else "does not meet the SLO"
            why = f"{_unrunnable_note(best).strip(' ;')}, and {_shapes()} {fails}"
        return ModeDecision(Mode.DISAGGREGATED, f"spec.serving.mode Auto: {why}", None)
    if disaggregated_per_gpu is None:
        return ModeDecision(
            Mode.COLOCATED,
            f"spec.serving.mode Auto: no disaggregated plan meets the SLO and colocated {run.label} does "
            f"({run.per_gpu:.2f} req/s per GPU)",
            run,
        )
    if disaggregated_per_gpu > run.per_gpu:
        return ModeDecision(
            Mode.DISAGGREGATED,
            f"spec.serving.mode Auto: disaggregation pays, {disaggregated_per_gpu:.2f} vs "
            f"{run.per_gpu:.2f} req/s per GPU colocated {run.label}" + _unrunnable_note(best),
            None,
        )
    return ModeDecision(
        Mode.COLOCATED,
        f"spec.serving.mode Auto: disaggregation does not pay, colocated {run.label} reaches "
        f"{run.per_gpu:.2f} req/s per GPU against {disaggregated_per_gpu:.2f}" + _unrunnable_note(best),
        run,
    )


def _unrunnable_note(best: PhaseResult | None) -> str:
    """When the best colocated shape is not one the worker runs: say so (the verdict names it)."""
    if best is None or (best.tp, best.pp) in RUNNABLE_COLOCATED:
        return ""
    return (
        f"; the best colocated shape, {best.label} at {best.per_gpu:.2f} req/s per GPU, is not one the "
        f"colocated worker runs ({_shapes()} only)"
    )
