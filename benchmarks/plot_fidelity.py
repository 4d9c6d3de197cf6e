"""Predicted and measured SLO attainment against the request rate, from a fidelity benchmark's
results JSON: `fidelity_verdict.py`'s (a panel per workload, both configurations) or
`fidelity.py`'s (one configuration). Both benchmarks draw it next to their JSON when they finish;
this redraws it from a committed result without re-running the 25-minute measurement:

    .venv/bin/python benchmarks/plot_fidelity.py benchmarks/results/verdict-issue15.json [-o FILE.png]

The output defaults to the JSON's path with .png (or -o FILE.svg). Needs the plot extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from distserve_planner.plots import PlotError, check_target, new_figure, save

PANEL = (5.0, 4.8)  # inches per panel; at plots.DPI 100 a verdict figure is 1000 x 480 pixels


def draw(result: dict[str, Any], path: str | Path) -> Path:
    """The figure for `result` (a benchmark's JSON, parsed) into `path`; PlotError when it cannot."""
    target = check_target(path)
    panels = _panels(result)
    figure, axes = new_figure(len(panels), (max(8.5, PANEL[0] * len(panels)), PANEL[1]))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (title, slo, configs) in zip(axes, panels, strict=True):
        goal = float(slo["attainmentPercent"])
        for i, (label, entry) in enumerate(configs):
            _series(ax, f"C{i}", label, entry, goal)
        ax.axhline(goal, color="black", linestyle=":", linewidth=1, label=f"attainment target {goal:g}%")
        ax.set_title(
            f"{title}\nTTFT {slo['ttftMillis']:g} ms, TPOT {slo['tpotMillis']:g} ms at {goal:g}%", fontsize=9
        )
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment (% of requests meeting both)")
        ax.set_ylim(0, 102)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    figure.suptitle(
        f"{result.get('benchmark', 'planner fidelity')}: attainment predicted (dashed, ○) and measured "
        "(solid, ●); goodput ▽ predicted, ▼ measured\n"
        f"profile {result.get('profile', '?')}, {result.get('requestsPerRate', '?')} requests per rate, "
        f"{_cpus(result)} CPUs, {result.get('created', '')}",
        fontsize=9,
    )
    return save(figure, target)


def _cpus(result: dict[str, Any]) -> object:
    return result.get("cpus") or result.get("machine", {}).get("cpus", "?")


def _panels(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]]:
    """(title, SLO, [(configuration, its series)]) per panel, for either benchmark's JSON."""
    if "workloads" in result:  # fidelity_verdict.py
        return [
            (
                str(w["workload"]),
                w["slo"],
                [(k, v) for k, v in w.items() if isinstance(v, dict) and "rates" in v],
            )
            for w in result["workloads"]
        ]
    if "rates" in result:  # fidelity.py: the goodputs sit apart from the rates
        g = result.get("goodput", {})
        entry = {
            "rates": result["rates"],
            "predictedGoodput": g.get("predicted"),
            "measured": {"goodput": g["measured"]} if g.get("measured") is not None else {},
        }
        return [(str(result.get("configuration", "")), result["slo"], [("1P+1D", entry)])]
    raise ValueError("not a fidelity benchmark's results: it has neither 'workloads' nor 'rates'")


def _series(ax: Any, color: str, label: str, entry: dict[str, Any], goal: float) -> None:
    rows = sorted(entry["rates"], key=lambda r: r["rate"])
    rates = [r["rate"] for r in rows]
    predicted = [r["attainmentPercent"]["predicted"] for r in rows]
    measured = [r["attainmentPercent"]["measured"] for r in rows]
    ax.plot(rates, predicted, "--o", color=color, markerfacecolor="white", label=f"{label}, predicted")
    ax.plot(rates, measured, "-o", color=color, label=f"{label}, measured")
    p = entry.get("predictedGoodput")
    if p:
        ax.plot([p], [goal], marker="v", markersize=9, color=color, markerfacecolor="white", zorder=4)
        ax.annotate(
            f"{p:g}", xy=(p, goal), xytext=(-4, 8), textcoords="offset points", fontsize=7, color=color
        )
    m = entry.get("measured", {})
    if "goodput" in m:
        ax.plot([m["goodput"]], [goal], marker="v", markersize=9, color=color, zorder=4)
        ax.annotate(
            f"{m['goodput']:g}",
            xy=(m["goodput"], goal),
            xytext=(-4, -14),
            textcoords="offset points",
            fontsize=7,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", help="a results JSON of fidelity_verdict.py or fidelity.py")
    parser.add_argument("-o", "--output", help="PNG or SVG to write (default: the JSON's path with .png)")
    args = parser.parse_args(argv)
    source = Path(args.results)
    try:
        written = draw_file(source, args.output)
    except CANNOT_PLOT as exc:
        print(f"{source}: cannot plot: {exc}", file=sys.stderr)
        return 2
    print(written)
    return 0


# A plot that cannot be drawn: no extra, a bad suffix, a JSON of another shape, an unwritable path.
CANNOT_PLOT = (PlotError, ValueError, OSError, KeyError)


def draw_file(source: Path, output: str | Path | None = None) -> Path:
    """The figure of one results JSON, by default beside it as .png."""
    return draw(json.loads(source.read_text()), output or source.with_suffix(".png"))


def draw_next_to(json_path: str | Path) -> None:
    """What a benchmark calls when it has written its JSON: the PNG beside it, or why not (a long
    measurement must not fail for want of the plot extra)."""
    try:
        print(f"[bench] plot: {draw_file(Path(json_path))}", file=sys.stderr)
    except CANNOT_PLOT as exc:
        print(f"[bench] no plot: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
