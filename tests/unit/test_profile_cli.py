"""`distserve profile` as a user runs it: a profile the planner loads, whose coefficients reproduce
the measured points within the error it states. Timings are never asserted (shared machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distserve_operator import cli
from distserve_planner import profiles
from distserve_planner.loaders import profile_files
from distserve_worker.profiling import fit

LOCAL = str(Path(__file__).parents[2] / "deploy" / "examples" / "local-smollm2.yaml")


def _profile(tmp_path: Path, *extra: str) -> tuple[int, Path, Path]:
    out, samples = tmp_path / "profile.json", tmp_path / "samples.json"
    code = cli.main(
        ["profile", "--random-llama", "tiny", "--quick", "-o", str(out), "--samples", str(samples), *extra]
    )
    return code, out, samples


def test_quick_profile_is_loadable_and_reproduces_its_points(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, samples = _profile(tmp_path)
    assert code == 0
    stdout, stderr = capsys.readouterr()
    assert f"wrote {out}" in stdout and "[profile] prefill" in stderr
    profile = profile_files.load(out)
    assert profile.model == "random-llama-tiny" and profile.dtype == "float32"
    assert profile.device.startswith("CPU (") and profile.created.endswith("Z")
    assert "distserve profile" in profile.source and "load average" in profile.source
    entry = profile.entry(1, 1)
    assert entry is not None and entry.samples is not None and entry.fit_error_percent is not None
    assert entry.decode_ranges and entry.decode_ranges[0].from_batch == 1
    assert all(c >= 0 for c in (*entry.prefill, *(x for r in entry.decode_ranges for x in r.coefficients)))
    # The stated fit error is what the coefficients really give on the measured points.
    raw = json.loads(samples.read_text())
    coefficients = profiles.latency_model(profile).coefficients(1, 1)
    assert coefficients is not None
    predicted, measured = [], []
    for p in raw["prefill"]:
        lengths = p["lengths"]
        predicted.append(coefficients.prefill_ms(sum(lengths), sum(n * n for n in lengths)))
        measured.append(p["ms"])
    for p in raw["decode"]:
        predicted.append(coefficients.decode_ms(p["ctxTokens"], p["batch"]))
        measured.append(p["ms"])
    assert entry.samples == len(measured)
    assert fit.errors(predicted, measured).mean_percent == pytest.approx(entry.fit_error_percent, abs=0.5)


def test_planner_uses_the_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _profile(tmp_path, "-q")
    assert code == 0
    capsys.readouterr()
    assert (
        cli.main(
            [
                "simulate",
                "-f",
                LOCAL,
                "--profile",
                str(out),
                "--prefill",
                "1x1",
                "--decode",
                "1x1",
                "-o",
                "json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert "random-llama-tiny" in result["profile"] and result["ttftMillis"]["p90"] > 0


def test_fit_recovers_known_coefficients() -> None:
    prefill = [
        fit.PrefillPoint(lengths, 3.0 + 0.5 * sum(lengths) + 0.001 * sum(n * n for n in lengths))
        for lengths in [(8,), (64,), (256,), (32, 32), (128,) * 4]
    ]
    coef, err = fit.fit_prefill(prefill)
    assert coef == pytest.approx((3.0, 0.5, 0.001), rel=1e-6) and err.max_percent < 1e-6
    decode = [
        fit.DecodePoint(
            b, b * ctx, (10 + 0.01 * b * ctx + 0.2 * b) if b < 8 else (4 + 0.02 * b * ctx + 1.0 * b)
        )
        for b in (1, 2, 4, 8, 16, 32)
        for ctx in (32, 128, 512)
    ]
    d = fit.fit_decode(decode)
    assert [start for start, _ in d.ranges] == [1, 8]
    assert d.abc(1) == pytest.approx((10, 0.01, 0.2), rel=1e-6)
    assert d.abc(8) == pytest.approx((4, 0.02, 1.0), rel=1e-6)


def test_fit_finds_each_kernel_change_in_batch_size() -> None:
    # The shape a CPU BLAS gives (measured on SmolLM2): a per-row kernel below 4 rows, a slower
    # one from 4 whose cost climbs fast, and a blocked one from 16 that is cheaper than 15 rows.
    def step(b: int, ctx: int) -> float:
        if b < 4:
            return 58 + 0.01 * ctx + 1.5 * b
        if b < 16:
            return 60 + 0.01 * ctx + 8.0 * b
        return 88 + 0.01 * ctx + 2.9 * b

    points = [
        fit.DecodePoint(b, b * ctx, step(b, b * ctx))
        for b in (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32)
        for ctx in (32, 128, 384)
    ]
    d = fit.fit_decode(points)
    assert [start for start, _ in d.ranges] == [1, 4, 16]
    assert d.error.max_percent < 1e-6
    assert d.ms(fit.DecodePoint(15, 1500, 0)) > d.ms(fit.DecodePoint(16, 1600, 0))
    # Noise alone is no reason to split: one line through a straight cost with +-2% jitter.
    jitter = [
        fit.DecodePoint(p.batch, p.ctx_tokens, (20 + 3 * p.batch) * (1.02 if i % 2 else 0.98))
        for i, p in enumerate(points)
    ]
    assert len(fit.fit_decode(jitter).ranges) == 1


def test_fit_keeps_coefficients_non_negative() -> None:
    # Noise that would pull an unconstrained fit's per-token cost below zero.
    points = [fit.PrefillPoint((n,), ms) for n, ms in [(8, 5.0), (16, 4.9), (32, 4.8), (64, 4.7)]]
    coef, _ = fit.fit_prefill(points)
    assert min(coef) >= 0 and coef[0] == pytest.approx(4.85, rel=0.05)


def test_cuda_without_cuda_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, _ = _profile(tmp_path, "--device", "cuda")
    assert code == 2 and not out.exists()
    assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_on_cuda(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    code, out, _ = _profile(tmp_path, "--device", "cuda", "--dtype", "bfloat16")
    assert code == 0
    profile = profile_files.load(out)
    assert profile.dtype == "bfloat16" and profile.device == torch.cuda.get_device_name(0)


def test_each_tp_size_gets_its_own_entry(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # TP2 runs two CPU rank processes over gloo, sharded by the workers' own TP code; TP3 cannot
    # split the tiny model's 4 heads and is skipped with the reason, the rest is still written.
    code, out, samples = _profile(tmp_path, "--tp", "1,2,3", "--repetitions", "2")
    assert code == 0
    stdout, stderr = capfd.readouterr()
    assert "TP1;" in stdout and "TP2;" in stdout
    assert "[profile] TP2 (2 ranks on cpu, gloo): prefill" in stderr
    assert "[profile] TP2 (2 ranks on cpu, gloo): decode" in stderr
    assert "skipping TP3 (--tp 1,2,3): TP3 does not divide the model's 4 attention heads" in stderr
    profile = profiles.parse(out.read_text(), source=str(out))
    assert sorted((e.tp, e.pp) for e in profile.entries) == [(1, 1), (2, 1)]
    tp2, tp2_raw = profile.entry(2, 1), json.loads(samples.read_text())["tensorParallel"]["2"]
    assert tp2 is not None and tp2.samples == len(tp2_raw["prefill"]) + len(tp2_raw["decode"])
    model = profiles.latency_model(profile)
    for tp in (1, 2):
        coefficients = model.coefficients(tp, 1)
        assert coefficients is not None
        # Sane: a 64-token prefill and a decode step of 8 rows take a positive time well under a
        # second on a 2-layer model, whatever else runs on the machine.
        assert 0 < coefficients.prefill_ms(64, 64 * 64) < 1000
        assert 0 < coefficients.decode_ms(8 * 64, 8) < 1000


def test_no_runnable_tp_size_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _profile(tmp_path, "--tp", "3,4")
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "skipping TP3 (--tp 3,4): TP3 does not divide the model's 4 attention heads" in err
    assert "skipping TP4 (--tp 3,4): TP4 does not divide the model's 2 key/value heads" in err
    assert "no size in --tp 3,4 can run this model here" in err


@pytest.mark.parametrize("text", ["0", "two", ""])
def test_bad_tp_list_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    code, out, _ = _profile(tmp_path, "--tp", text)
    assert code == 2 and not out.exists()
    assert f"--tp {text!r}: give positive TP sizes separated by commas" in capsys.readouterr().err


def test_tp_needs_a_cuda_device_per_rank() -> None:
    from distserve_worker.profiling.randommodel import random_config
    from distserve_worker.profiling.tpmeasure import refusal

    config = random_config("llama-3-8b")
    assert refusal(config, 4, "cuda", 1) == "TP4 needs 4 CUDA devices (one per rank), this machine has 1"
    assert refusal(config, 4, "cuda", 8) == "" and refusal(config, 4, "cpu", 0) == ""


@pytest.mark.gpu
def test_tp_profile_on_cuda(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # NCCL between cuda:0 and cuda:1 when there are two devices; on one, TP2 is skipped and said so.
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    code, out, _ = _profile(tmp_path, "--device", "cuda", "--dtype", "bfloat16", "--tp", "1,2")
    assert code == 0
    entries = sorted(e.tp for e in profile_files.load(out).entries)
    if torch.cuda.device_count() >= 2:
        assert entries == [1, 2] and "(2 ranks on cuda, nccl)" in capfd.readouterr().err
    else:
        assert entries == [1] and "TP2 needs 2 CUDA devices" in capfd.readouterr().err
