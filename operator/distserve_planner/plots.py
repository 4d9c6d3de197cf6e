"""Figures for `distserve plan --plot` and `distserve simulate --plot` (PNG or SVG, by suffix).

matplotlib is the `plot` extra, not a dependency: it is imported inside the drawing functions
only, so the planner (and the operator image, which does not install it) never loads it; the
import contract `plot-extra-only-here` keeps it that way. Figures are drawn on a `Figure` of their
own, never through pyplot, so no display and no global backend are involved.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Simulated
    from .curves import Curves
    from .search import SloTargets

MISSING = "--plot needs matplotlib: pip install 'distserve[plot]'"
FORMATS = (".png", ".svg")
SIZE = (9.0, 5.5)  # inches
DPI = 100  # so a PNG is 900 x 550 pixels
MARKER_GROUP = 0.01  # goodputs within 1% share one annotation (equal plans would print over each other)


class PlotError(ValueError):
    """A --plot that cannot be drawn: the message says why and what to do."""


def check_target(path: str | Path) -> Path:
    """The file to draw into; PlotError for a suffix other than .png or .svg, or without matplotlib.
    Called before planning, so that a bad --plot fails at once."""
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise PlotError(
            f"--plot {path}: cannot tell the image format from {target.suffix or 'no suffix'!r}; "
            "name a .png or .svg file"
        )
    _figure_class()
    return target


def plot_arg_ok(path: str | Path) -> bool:
    """The CLIs' check of --plot before any work: False (the reason on stderr) when it cannot be drawn."""
    try:
        check_target(path)
    except PlotError as exc:
        print(exc, file=sys.stderr)
        return False
    return True


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(MISSING) from None
    return Figure


def new_figure(ncols: int = 1, size: tuple[float, float] = SIZE) -> tuple[Any, Any]:
    """A figure of `size` inches at `DPI` (what a PNG's pixels are) and its `ncols` axes."""
    figure = _figure_class()(figsize=size, dpi=DPI, layout="constrained")
    return figure, figure.subplots(1, ncols)


def save(figure: Any, target: Path) -> Path:
    """Write `figure` as PNG or SVG, by the suffix (`check_target` has accepted it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=DPI, format=target.suffix.lower().lstrip("."))
    return target


def _slo_text(ttft_ms: float, tpot_ms: float, target_percent: float) -> str:
    return f"SLO: TTFT {ttft_ms:g} ms and TPOT {tpot_ms:g} ms for {target_percent:g}% of requests"


def draw_attainment(curves: Curves, path: str | Path) -> Path:
    """SLO attainment against the request rate per GPU, one curve per plan; the attainment target,
    the workload's rate on the chosen plan, and a marker where each curve crosses the target (its
    goodput per GPU, the plan simulated whole; the legend also gives the report's per-phase figure)."""
    target = check_target(path)
    figure, ax = new_figure()
    goal = curves.target_percent
    marked: list[tuple[float, str, list[float]]] = []  # (goodput, colour of its first plan, all)
    for i, c in enumerate(curves.curves):
        color = f"C{i % 10}"
        xs, ys = [x for x, _ in c.points], [y for _, y in c.points]
        crossing = c.crossing
        whole = f"{crossing:.2f}" if crossing is not None else "n/a"
        label = f"{c.label} ({c.gpus} GPUs): {whole} per GPU (report {c.goodput_per_gpu:.2f})" + (
            ", chosen" if c.chosen else ""
        )
        ax.plot(
            xs,
            ys,
            color=color,
            linestyle="--" if c.colocated else "-",
            linewidth=2.6 if c.chosen else 1.4,
            marker="." if c.chosen else None,
            label=label,
            zorder=3 if c.chosen else 2,
        )
        if crossing is not None and crossing > 0:
            group = next((g for g in marked if abs(g[0] / crossing - 1) <= MARKER_GROUP), None)
            if group is None:
                marked.append((crossing, color, [crossing]))
            else:
                group[2].append(crossing)
    # One marker per crossing: plans that cross alike (within 1%) would hide each other's.
    for n, (x, color, same) in enumerate(sorted(marked)):
        ax.plot([x], [goal], marker="o", color=color, markeredgecolor="black", markersize=8, zorder=4)
        plans = f" ({len(same)} plans)" if len(same) > 1 else ""
        # Staggered rows below the target line, so that neighbouring goodputs stay legible.
        ax.annotate(
            f"{x:.2f}{plans}",
            xy=(x, goal),
            xytext=(-4, -16 - 12 * (n % 4)),
            textcoords="offset points",
            fontsize=8,
            color=color,
        )
    ax.axhline(goal, color="black", linewidth=1, linestyle=":", label=f"attainment target {goal:g}%")
    ax.plot(
        [],
        [],
        marker="o",
        linestyle="none",
        color="white",
        markeredgecolor="black",
        label="goodput per GPU (req/s): where the plan, simulated whole, crosses the target "
        "(the report's figure sizes each phase alone)",
    )
    per_gpu = curves.workload_per_gpu
    if per_gpu is not None:
        ax.axvline(
            per_gpu,
            color="grey",
            linewidth=1.2,
            linestyle="-.",
            label=f"workload {curves.rate:g} req/s on the chosen {curves.chosen_gpus} GPUs "
            f"({per_gpu:.2f} req/s per GPU)",
        )
    if not curves.curves:
        ax.text(0.5, 0.5, "no configuration meets the SLO", ha="center", transform=ax.transAxes)
    ax.set_xlabel("request rate per GPU (req/s per GPU)")
    ax.set_ylabel("SLO attainment (% of requests meeting both)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower left")
    gpus = (
        f"the chosen plan uses {curves.chosen_gpus} of the {curves.budget_gpus} GPUs budgeted"
        if curves.chosen_gpus
        else f"no plan within the {curves.budget_gpus} GPUs budgeted"
    )
    figure.suptitle(
        f"{curves.model} on {curves.device}: {gpus}\n"
        f"{_slo_text(curves.ttft_ms, curves.tpot_ms, goal)}; curves: each plan simulated whole",
        fontsize=10,
    )
    return save(figure, target)


def draw_latencies(result: Simulated, slo: SloTargets, model: str, device: str, path: str | Path) -> Path:
    """TTFT and TPOT of one simulated configuration as distributions (CDFs), each against its SLO."""
    target = check_target(path)
    figure, (left, right) = new_figure(2)
    goal = round(100 * slo.attainment, 2)
    for ax, values, limit, name in (
        (left, result.outcome.ttft, slo.ttft_ms, "TTFT"),
        (right, result.outcome.tpot, slo.tpot_ms, "TPOT"),
    ):
        _cdf(ax, values, limit, name, goal)
    joint = 100 * result.outcome.attainment(slo.ttft_ms, slo.tpot_ms)
    figure.suptitle(
        f"{model} on {result.gpus} × {device}: {result.configuration} at {result.rate:g} req/s\n"
        f"{_slo_text(slo.ttft_ms, slo.tpot_ms, goal)}; both met by {joint:.1f}% "
        f"of {len(result.outcome.ttft)} simulated requests",
        fontsize=10,
    )
    return save(figure, target)


def _cdf(ax: Any, values: Sequence[float], limit: float, name: str, goal: float) -> None:
    ordered = sorted(values)
    n = len(ordered)
    share = 100 * sum(1 for v in ordered if v <= limit) / n if n else 0.0
    ax.step(
        ordered, [100 * (k + 1) / n for k in range(n)], where="post", color="C0", label=f"{name}, simulated"
    )
    ax.axvline(limit, color="C3", linestyle="--", label=f"{name} SLO {limit:g} ms: {share:.1f}% within")
    ax.axhline(goal, color="black", linestyle=":", linewidth=1, label=f"attainment target {goal:g}%")
    ax.set_xlabel(f"{name} (ms)")
    ax.set_ylabel("requests at or below (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, 1.08 * max(limit, ordered[-1] if ordered else limit))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
