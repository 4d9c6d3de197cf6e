"""`distserve plan` and `distserve simulate` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distserve_operator import cli

EXAMPLE = str(Path(__file__).parents[2] / "deploy" / "examples" / "opt-13b-a100x4.yaml")


def test_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "-f", EXAMPLE, "-o", "json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["plan"]["prefill"]["replicas"] >= 1 and data["plan"]["decode"]["tp"] >= 1
    assert data["plan"]["affinity"] == "High" and data["plan"]["nodeSpan"] == 1
    assert data["plan"]["estimated"]["goodputPerGPU"] > 0 and data["searchSeconds"] >= 0
    assert "planning:" in err  # progress goes to stderr, never into the JSON


def test_plan_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "-f", EXAMPLE, "-q"]) == 0
    out, err = capsys.readouterr()
    assert "prefill" in out and "decode" in out and "verdict:" in out and "colocated best" in out
    assert err == ""


def test_invalid_manifest_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(EXAMPLE).read_text().replace("ttftMillis: 200", "ttftMillis: -5"))
    assert cli.main(["plan", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.slo.ttftMillis" in err and "fix:" in err


def test_unknown_model_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(EXAMPLE).read_text().replace("facebook/opt-13b", "acme/mystery-7b"))
    assert cli.main(["plan", "-f", str(bad), "-q"]) == 2
    assert "spec.model.architecture" in capsys.readouterr().err


def test_infeasible_slo_exits_zero_with_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(Path(EXAMPLE).read_text().replace("ttftMillis: 200", "ttftMillis: 5"))
    assert cli.main(["plan", "-f", str(strict), "-q"]) == 0
    out = capsys.readouterr().out
    assert "INFEASIBLE" in out and "closest candidate" in out


def test_simulate_one_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(
            ["simulate", "-f", EXAMPLE, "--prefill", "2x1", "--decode", "1x1", "--rate", "2", "-o", "json"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 3 and data["attainmentPercent"] > 90
    assert data["ttftMillis"]["p50"] > 0
    assert cli.main(["simulate", "-f", EXAMPLE, "--colocated", "1x1:2", "--rate", "2", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 2
    assert cli.main(["simulate", "-f", EXAMPLE, "--prefill", "3x1", "--decode", "1x1"]) == 2
    assert "TP3" in capsys.readouterr().err
