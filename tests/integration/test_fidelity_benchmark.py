"""`make bench-fidelity` end to end on a tiny model: the benchmark script drives the real local
stack and the simulator with the same requests and writes the JSON summary anyone can re-check
(issue 6, point 4). Timings are never asserted (shared machine); the summary's content is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from distserve_operator import cli
from distserve_worker.testing.tiny import save_tiny_model

ROOT = Path(__file__).parents[2]


def test_fidelity_benchmark_writes_predicted_and_measured_per_rate(tmp_path: Path) -> None:
    model = save_tiny_model("llama", tmp_path / "llama")
    profile = tmp_path / "profile.json"
    args = ["--model-name", "tiny-llama", "--model-source", "Path", "--model-path", str(model)]
    assert cli.main(["profile", *args, "--quick", "-q", "-o", str(profile)]) == 0
    manifest = yaml.safe_load((ROOT / "benchmarks" / "fidelity-smollm2.yaml").read_text())
    manifest["spec"]["model"] = {"name": "tiny-llama", "source": {"kind": "Path", "path": str(model)}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(manifest))
    out = tmp_path / "fidelity.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fidelity.py"),
            "-f",
            str(tmp_path / "tiny.yaml"),
            "--profile",
            str(profile),
            "--requests",
            "8",
            "--rates",
            "4,40",
            "--quiet-timeout",
            "5",  # a test measures whatever the machine is doing
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["profile"] == str(profile) or summary["profile"].endswith("profile.json")
    assert summary["engine"] == {"prefillTokenBudget": 512, "decodeMaxBatch": 32, "decodeMaxKvTokens": 65536}
    assert [r["rate"] for r in summary["rates"]] == [4.0, 40.0]
    for row in summary["rates"]:
        assert row["failedRequests"] == 0  # every request of the real stack answered
        for metric in ("ttftP90Millis", "tpotP90Millis", "attainmentPercent"):
            both = row[metric]
            assert set(both) == {"predicted", "measured"}
            assert all(math.isfinite(v) and v >= 0 for v in both.values()), (metric, both)
        assert 0 <= row["attainmentPercent"]["measured"] <= 100
        assert {"ttftP90Error", "tpotP90Error", "attainmentErrorPoints", "busyCoresBefore"} <= set(row)
    lone = summary["loneRequest"]
    assert lone["ttftMillis"]["measuredMedian"] > 0 and lone["tpotMillis"]["predicted"] > 0
    goodput = summary["goodput"]
    assert goodput["predicted"] > 0
    # Measured goodput is where measured attainment crosses the target, or a bound when it does
    # not cross between the rates tried.
    assert (goodput["measured"] is not None) != (goodput["measuredBound"] is not None)
    assert "TTFT p90 pred/meas" in run.stdout  # the printed table
