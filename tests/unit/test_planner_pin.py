"""Pinned plans, un-shardable TPs and engine limits, as `distserve plan` users and the operator see them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from distserve_operator import api, cli
from distserve_planner import plan_deployment

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
OPT13 = EXAMPLES / "opt-13b-a100x4.yaml"


def _opt13(**spec: Any) -> api.DistServeDeployment:
    """The paper's example on the analytical model (its bundled profile leaves a pin of two TP1
    prefills as good as the planner's choice: nothing to compare), with these spec sections."""
    doc = yaml.safe_load(OPT13.read_text())
    del doc["spec"]["planner"]
    doc["spec"] = {**doc["spec"], **copy.deepcopy(spec)}
    return api.parse_resource(doc)


def _pin(prefill: tuple[int, int, int], decode: tuple[int, int, int]) -> dict[str, Any]:
    def phase(t: tuple[int, int, int]) -> dict[str, int]:
        return {"tp": t[0], "pp": t[1], "replicas": t[2]}

    return {"pin": {"prefill": phase(prefill), "decode": phase(decode)}}


# ---------------------------------------------------------------------------- pins


def test_a_pinned_plan_is_the_plan_and_is_compared_with_the_planners_choice() -> None:
    free = plan_deployment(_opt13()).plan
    pinned = plan_deployment(_opt13(planner=_pin((1, 1, 2), (1, 1, 1)))).plan
    # What is deployed is the pin, not the search's choice.
    assert (pinned.prefill.tp, pinned.prefill.pp, pinned.prefill.replicas) == (1, 1, 2)
    assert (pinned.decode.tp, pinned.decode.pp, pinned.decode.replicas) == (1, 1, 1)
    assert pinned.pinned and not free.pinned and pinned.gpus == 3
    assert pinned.candidates[0].prefill.replicas == 2 and pinned.candidates[0].gpus == 3
    # It was simulated: goodput per GPU, attainment, p90 latencies and the binding constraint.
    est = pinned.estimated
    assert est.goodput_per_gpu > 0 and est.attainment_percent is not None and est.attainment_percent > 90
    assert est.ttft_p90_millis and est.tpot_p90_millis and pinned.bottleneck is not api.Bottleneck.NONE
    # The planner's own choice is the unpinned plan, and the verdict says it would be better, by how much.
    own = pinned.planner_choice
    assert own is not None
    assert (own.prefill.tp, own.prefill.pp, own.decode.tp, own.decode.pp) == (
        free.prefill.tp,
        free.prefill.pp,
        free.decode.tp,
        free.decode.pp,
    )
    assert own.goodput_per_gpu > est.goodput_per_gpu
    gain = own.goodput_per_gpu / est.goodput_per_gpu - 1
    assert "Pinned by spec.planner.pin" in pinned.verdict
    assert f"would be better by {gain:.0%} per GPU" in pinned.verdict
    assert pinned.limits is not None and pinned.limits.decode_kv_tokens > 0


def test_a_pin_keeps_its_replicas_even_when_they_do_not_serve_the_rate() -> None:
    p = plan_deployment(_opt13(planner=_pin((1, 1, 1), (1, 1, 1)))).plan
    assert (p.prefill.replicas, p.decode.replicas) == (1, 1)  # no replica added by the joint check
    assert p.estimated.attainment_percent is not None and p.estimated.attainment_percent < 90
    assert "raise spec.planner.pin replicas" in p.verdict


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            {"planner": _pin((3, 1, 1), (1, 1, 1))},
            "spec.planner.pin.prefill.tp",
            "does not divide the model's 40 attention heads",
        ),
        ({"planner": _pin((1, 1, 1), (8, 1, 1))}, "spec.planner.pin.decode.tp", "wider than a node's 4 GPUs"),
        (
            {"planner": _pin((1, 3, 1), (1, 1, 1))},
            "spec.planner.pin.prefill.pp",
            "does not divide the model's 40",
        ),
        ({"planner": _pin((2, 1, 2), (1, 1, 1))}, "spec.planner.pin", "more than the 4 of cluster.nodes"),
        (
            {
                "planner": _pin((1, 1, 1), (1, 1, 1)),
                "cluster": {"gpu": {"type": "A100-40GB"}, "gpusPerNode": 4},
            },
            "spec.planner.pin.prefill",
            "memory",
        ),
    ],
)
def test_a_pin_that_cannot_run_is_refused_naming_the_field(
    spec: dict[str, Any], field: str, words: str
) -> None:
    if "cluster" in spec:  # OPT-13B in fp32 needs 52 GB: no single 40 GB GPU holds it
        spec = {**spec, "model": {"name": "facebook/opt-13b", "dtype": "float32"}}
    with pytest.raises(ValueError) as exc:
        plan_deployment(_opt13(**spec))
    message = str(exc.value)
    assert message.startswith(field) and words in message
    assert "use " in message or "fix" in message or "lower" in message  # and the fix


def test_distserve_plan_prints_the_pins_figures_and_the_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["plan", "-q", "-f", str(EXAMPLES / "llama3-8b-h100x8-pinned.yaml")]) == 0
    out = capsys.readouterr().out
    assert "pinned by spec.planner.pin" in out and "planner's own choice:" in out
    assert "prefill  TP2 PP1 × 1" in out and "decode   TP1 PP1 × 2" in out
    assert "attainment" in out and "p90 TTFT" in out and "engine     prefill token budget 4096" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "llama3-8b-h100x8-pinned.yaml").read_text().replace("tp: 2,", "tp: 3,"))
    assert cli.main(["plan", "-q", "-f", str(bad)]) == 2
    assert "spec.planner.pin.prefill.tp: TP3 does not divide" in capsys.readouterr().err


# ---------------------------------------------------------------------------- un-shardable TP


def test_opt13b_tp3_is_skipped_with_the_heads_reason_not_scored(capsys: pytest.CaptureFixture[str]) -> None:
    report = plan_deployment(_opt13())
    assert report.skipped == ["TP3 does not divide the model's 40 attention heads: use a TP that divides 40"]
    assert not any(r.tp == 3 for r in report.phase_results)  # never simulated
    assert not any("TP3" in r for r in report.rejected)
    assert all(3 not in (c.prefill.tp, c.decode.tp) for c in report.plan.candidates)
    assert cli.main(["plan", "-f", str(OPT13), "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert "TP3 does not divide the model's 40 attention heads" in json.loads(out)["skipped"][0]
    assert "0.00 req/s" not in err  # progress lines no longer score it
    assert "skipped: TP3 does not divide" in err


# ---------------------------------------------------------------------------- engine limits


def test_the_plan_carries_the_limits_it_simulated() -> None:
    gpu = plan_deployment(_opt13()).plan
    assert gpu.limits == api.EngineLimits(
        prefill_token_budget=2048, decode_max_batch=256, decode_kv_tokens=gpu.limits.decode_kv_tokens
    )
    tuned = plan_deployment(_opt13(engine={"prefillTokenBudget": 1024, "decodeMaxBatch": 64})).plan
    assert tuned.limits is not None
    assert (tuned.limits.prefill_token_budget, tuned.limits.decode_max_batch) == (1024, 64)
    cpu = plan_deployment(api.load_manifest(EXAMPLES / "local-smollm2.yaml")).plan
    assert cpu.limits is not None and cpu.limits.decode_max_batch == 32


def test_a_tiny_decode_batch_lowers_predicted_goodput() -> None:
    pin = _pin((1, 1, 2), (1, 1, 1))
    wide = plan_deployment(_opt13(planner=pin)).plan
    narrow = plan_deployment(_opt13(planner=pin, engine={"decodeMaxBatch": 2})).plan
    assert narrow.decode.max_rate_per_instance is not None and wide.decode.max_rate_per_instance is not None
    assert narrow.decode.max_rate_per_instance < wide.decode.max_rate_per_instance / 2
    assert narrow.estimated.goodput_per_gpu < wide.estimated.goodput_per_gpu
    assert narrow.bottleneck is api.Bottleneck.BATCH
    assert "decodeMaxBatch" in narrow.verdict
