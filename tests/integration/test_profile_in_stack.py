"""`distserve profile --in-stack`: the profile fitted to the forwards a running local stack timed
under load (`GET /forwards` on each worker). Timings are never asserted (shared machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distserve_operator import cli
from distserve_operator.planner import profiles
from distserve_worker.testing.tiny import save_tiny_model


def test_in_stack_profile_comes_from_the_running_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model("llama", tmp_path / "llama")
    out, samples = tmp_path / "profile.json", tmp_path / "samples.json"
    code = cli.main(
        [
            "profile",
            "--in-stack",
            "--model-name",
            "tiny-llama",
            "--model-source",
            "Path",
            "--model-path",
            str(model),
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
    profile = profiles.load(out)
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


def test_in_stack_refuses_what_the_local_workers_cannot_load(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["profile", "--in-stack", "--random-llama", "tiny", "-o", "/tmp/never.json"])
    assert code == 2
    assert "--in-stack runs the local stack's workers" in capsys.readouterr().err
