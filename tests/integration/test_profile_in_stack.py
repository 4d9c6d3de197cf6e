"""`distserve profile --in-stack`: the profile fitted to the forwards a running local stack timed
under load (`GET /forwards` on each worker). Timings are never asserted (shared machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distserve_operator import cli
from distserve_planner.loaders import profile_files
from distserve_worker.testing.tiny import save_tiny_model


def test_in_stack_profile_comes_from_the_running_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model("llama", tmp_path / "llama")
    # The deployment's manifest gives the model and the traffic the ramp sends.
    manifest = {
        "apiVersion": "distserve.io/v1alpha1",
        "kind": "DistServeDeployment",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"name": "tiny-llama", "source": {"kind": "Path", "path": str(model)}},
            "slo": {"ttftMillis": 1000, "tpotMillis": 100},
            "workload": {"requestsPerSecond": "1", "inputTokens": {"mean": 24}, "outputTokens": {"mean": 6}},
            "cluster": {"gpu": {"type": "CPU"}, "gpusPerNode": 2, "nodes": 1},
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(manifest))
    out, samples = tmp_path / "profile.json", tmp_path / "samples.json"
    code = cli.main(
        [
            "profile",
            "--in-stack",
            "-f",
            str(tmp_path / "tiny.yaml"),
            "--stack-rates",
            "5,2000",
            "--stack-seconds",
            "0.1",
            "--token-budget",
            "2048",
            "--quiet-timeout",
            "5",  # a test measures whatever the machine is doing
            "--quick",
            "-o",
            str(out),
            "--samples",
            str(samples),
        ]
    )
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    assert "starting the local stack" in stderr and "requests answered" in stderr
    profile = profile_files.load(out)
    assert profile.model == "tiny-llama"
    entry = profile.entry(1, 1)
    assert entry is not None and entry.batching == "padded"
    raw = json.loads(samples.read_text())
    # Under the burst (200 requests in 0.1 s) the workers really batched: shapes a lone request never has.
    assert max(p["batch"] for p in raw["decode"]) > 1  # the stack's forwards, not the sweep's
    assert max(len(p["lengths"]) for p in raw["prefill"]) > 1
    assert all(len(set(p["lengths"])) == 1 for p in raw["prefill"])  # padded: rows x longest
    assert raw["inStack"]["prefillFactor"] > 0 and raw["inStack"]["decodeFactor"] > 0
    assert "scaled to the running local stack" in profile.source
    assert "prompts mean 24, outputs mean 6 tokens" in profile.source  # the manifest's traffic
    # The ramp really sent the manifest's 24-token prompts: every prefill forward is 24 wide.
    assert {w for p in raw["prefill"] for w in p["lengths"]} == {24}


def test_in_stack_refuses_what_the_local_workers_cannot_load(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["profile", "--in-stack", "--random-llama", "tiny", "-o", "/tmp/never.json"])
    assert code == 2
    assert "--in-stack runs the local stack's workers" in capsys.readouterr().err
