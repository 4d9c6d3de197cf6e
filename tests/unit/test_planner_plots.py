"""`distserve plan --plot` and `distserve simulate --plot`, the curves they draw, and the fidelity
benchmark's figure redrawn from a committed results JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest
from matplotlib.image import imread

from distserve_operator import api, cli
from distserve_planner import plan, plots
from distserve_planner.curves import Curves, attainment_curves
from distserve_planner.loaders.spec import plan_input
from distserve_planner.report import PlanReport

ROOT = Path(__file__).parents[2]
EXAMPLE = str(ROOT / "deploy" / "examples" / "opt-13b-a100x4.yaml")
PIXELS = (round(plots.SIZE[1] * plots.DPI), round(plots.SIZE[0] * plots.DPI))  # rows, columns


def test_plan_plot_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "out" / "plan.png"
    assert cli.main(["plan", "-f", EXAMPLE, "-q", "--plot", str(png)]) == 0
    assert "verdict:" in capsys.readouterr().out  # the report is printed as without --plot
    assert imread(png).shape[:2] == PIXELS


def test_simulate_plot_png_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["simulate", "-f", EXAMPLE, "--prefill", "2x1", "--decode", "1x1", "--rate", "4"]
    png, svg = tmp_path / "sim.png", tmp_path / "sim.svg"
    assert cli.main([*base, "--plot", str(png)]) == 0
    assert imread(png).shape[:2] == PIXELS
    assert f"plot: {png}" in capsys.readouterr().err
    assert cli.main([*base, "-o", "json", "--plot", str(svg)]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 3  # the figures still print
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("width") == f"{plots.SIZE[0] * 72:g}pt"  # SVG sizes in points: 72 per inch


def test_importing_the_planner_loads_no_matplotlib() -> None:
    """The operator image lacks the plot extra: only drawing may load it."""
    code = (
        "import sys, distserve_planner.plots, distserve_planner.curves, distserve_planner.cli_plan, "
        "distserve_planner.cli_simulate; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(ROOT / r) for r in ("operator", "worker", "protos")),
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr


def test_unknown_suffix_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "-f", EXAMPLE, "--plot", str(tmp_path / "plan.jpg")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and ".png or .svg" in err
    assert "planning:" not in err  # refused before any planning, not after it
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_missing_plot_extra_is_one_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import matplotlib...` raise ImportError, as when it is not installed.
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    args = ["--prefill", "2x1", "--decode", "1x1"] if command == "simulate" else []
    assert cli.main([command, "-f", EXAMPLE, *args, "--plot", str(tmp_path / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == "--plot needs matplotlib: pip install 'distserve[plot]'" and out == ""


@pytest.fixture(scope="module")
def planned() -> tuple[PlanReport, Curves]:
    inp = plan_input(api.load_manifest(EXAMPLE).spec)
    report = plan(inp)
    return report, attainment_curves(inp, report)


def test_markers_are_where_curves_cross_the_target(planned: tuple[PlanReport, Curves]) -> None:
    """Each marker sits between the last point at or above the target and the first below it."""
    _, curves = planned
    for c in curves.curves:
        x = c.crossing
        assert x is not None, c.label
        above = max(r for r, y in c.points if r <= x)
        below = min(r for r, y in c.points if r >= x)
        assert dict(c.points)[above] >= curves.target_percent > dict(c.points)[below], c.label


def test_curves_carry_the_goodputs_the_report_prints(planned: tuple[PlanReport, Curves]) -> None:
    report, curves = planned
    s = report.status
    chosen = next(c for c in curves.curves if c.chosen)
    assert chosen.goodput_per_gpu == s.estimated.goodput_per_gpu
    assert f"= {chosen.goodput_per_gpu:.2f} req/s per GPU" in report.table()
    disaggregated = [c for c in curves.curves if not c.colocated]
    assert [c.goodput_per_gpu for c in disaggregated] == [c.goodput_per_gpu for c in s.candidates]
    assert [c.gpus for c in disaggregated] == [c.gpus for c in s.candidates]
    (colocated,) = [c for c in curves.curves if c.colocated]
    assert s.colocated is not None and colocated.goodput_per_gpu == s.colocated.goodput_per_gpu
    assert f"{colocated.goodput_per_gpu:.2f} req/s per GPU" in report.table()


def test_curves_pass_through_the_reported_attainment(planned: tuple[PlanReport, Curves]) -> None:
    """At the workload's rate the chosen plan's curve is the report's own estimate, and past the
    highest goodput every curve has fallen below the target."""
    report, curves = planned
    chosen = next(c for c in curves.curves if c.chosen)
    assert curves.workload_per_gpu == pytest.approx(10 / report.status.gpus)
    at_workload = dict(chosen.points)[curves.rate / chosen.gpus]
    assert at_workload == report.status.estimated.attainment_percent
    for c in curves.curves:
        rates = [x for x, _ in c.points]
        assert rates == sorted(rates) and rates[0] > 0
        assert c.points[0][1] >= curves.target_percent > c.points[-1][1], c.label


def _plot_fidelity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plot_fidelity", ROOT / "benchmarks" / "plot_fidelity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fidelity_figure_from_committed_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot_fidelity = _plot_fidelity()
    results = ROOT / "benchmarks" / "results" / "verdict-issue15-quiet.json"
    out = tmp_path / "verdict.png"
    assert plot_fidelity.main([str(results), "-o", str(out)]) == 0
    # One panel per workload, side by side.
    assert imread(out).shape[:2] == (480, 1000)
    single = tmp_path / "fidelity.svg"
    assert plot_fidelity.main([str(results.with_name("fidelity.json")), "-o", str(single)]) == 0
    assert ET.parse(single).getroot().tag.endswith("svg")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmark": "something else"}))
    assert plot_fidelity.main([str(other)]) == 2
    assert "not a fidelity benchmark's results" in capsys.readouterr().err
