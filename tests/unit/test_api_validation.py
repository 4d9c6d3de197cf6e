"""Invalid specs are refused with a message that names the field (camelCase path) and the fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from distserve_operator.api import SpecError, load_manifest, parse_resource, parse_spec

VALID: dict[str, Any] = {
    "model": {"name": "facebook/opt-13b", "dtype": "float16"},
    "slo": {"ttftMillis": 200, "tpotMillis": 100, "attainmentPercent": 90},
    "workload": {"requestsPerSecond": "10", "inputTokens": {"mean": 512}, "outputTokens": {"mean": 128}},
    "cluster": {"gpu": {"type": "A100-80GB"}, "gpusPerNode": 4, "nodes": 1},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """VALID with one dotted path set (value `...` deletes it)."""
    spec = copy.deepcopy(VALID)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return spec


# (spec, the field path the message must name, a word of the fix the message must contain)
INVALID = [
    (_with("slo.ttftMillis", -5), "spec.slo.ttftMillis", "above 0"),
    (_with("slo.tpotMillis", 0), "spec.slo.tpotMillis", "above 0"),
    (_with("slo.attainmentPercent", 101), "spec.slo.attainmentPercent", "at most 100"),
    (_with("slo.ttftMillis", 200.5), "spec.slo.ttftMillis", "whole number"),
    (_with("slo.ttftMillis", ...), "spec.slo.ttftMillis", "add this required field"),
    (_with("slo.ttftMilis", 200), "spec.slo.ttftMilis", "did you mean 'ttftMillis'"),
    (_with("model.name", ""), "spec.model.name", "non-empty"),
    (_with("model.dtype", "fp8"), "spec.model.dtype", "pick one of"),
    (_with("model.source", {"kind": "GGUF"}), "spec.model.source", "source.path"),
    (_with("model.source", {"kind": "GGUF", "path": "/m/model.bin"}), "spec.model.source", ".gguf"),
    (_with("model.source", {"kind": "PVC"}), "spec.model.source", "claimName"),
    (
        _with(
            "model.architecture",
            {"layers": 2, "hiddenSize": 100, "heads": 3, "intermediateSize": 64, "vocabSize": 10},
        ),
        "spec.model.architecture",
        "divisible",
    ),
    (
        _with(
            "model.architecture",
            {
                "layers": 2,
                "hiddenSize": 96,
                "heads": 6,
                "kvHeads": 4,
                "intermediateSize": 64,
                "vocabSize": 10,
            },
        ),
        "spec.model.architecture",
        "kvHeads",
    ),
    (_with("workload.requestsPerSecond", 0.5), "spec.workload.requestsPerSecond", '"0.5"'),
    (_with("workload.requestsPerSecond", "fast"), "spec.workload.requestsPerSecond", "500m"),
    (_with("workload.requestsPerSecond", -3), "spec.workload.requestsPerSecond", "negative"),
    (
        _with("workload.inputTokens", {"mean": 512, "p90": 100}),
        "spec.workload.inputTokens",
        "at least the mean",
    ),
    (
        _with("workload.inputTokens", {"mean": 512, "p90": 900, "max": 600}),
        "spec.workload.inputTokens",
        "raise max",
    ),
    (
        _with("workload.inputTokens", {"mean": 512, "p90": 900, "distribution": "Fixed"}),
        "spec.workload.inputTokens",
        "LogNormal",
    ),
    (_with("workload.outputTokens.mean", 0), "spec.workload.outputTokens.mean", "at least 1"),
    (_with("workload.burstinessPercent", 300), "spec.workload", "arrival: Gamma"),
    (_with("workload.arrival", "Bursty"), "spec.workload.arrival", "pick one of"),
    (_with("cluster.gpu", {"type": "A10"}), "spec.cluster.gpu.type", "pick one of"),
    (_with("cluster.gpu", {"type": "Custom", "memoryGiB": 48}), "spec.cluster.gpu", "tflops, hbmGBps"),
    (_with("cluster.maxGPUs", 64), "spec.cluster", "lower maxGPUs"),
    (_with("cluster.gpusPerNode", 0), "spec.cluster.gpusPerNode", "at least 1"),
    (
        _with("cluster.interconnect", {"intraNodeGBps": 10, "interNodeGBps": 50}),
        "spec.cluster.interconnect",
        "NVLink",
    ),
    (
        _with("cluster.tolerations", [{"operator": "Maybe"}]),
        "spec.cluster.tolerations[0].operator",
        "pick one of",
    ),
    (_with("placement", {"affinity": "Medium"}), "spec.placement.affinity", "pick one of"),
    (_with("autoscaling", {"mode": False}), "spec.autoscaling.mode", '"Off" in quotes'),
    (
        _with("autoscaling", {"metrics": {"source": "Prometheus"}}),
        "spec.autoscaling.metrics",
        "prometheusURL",
    ),
    (
        _with("autoscaling", {"metrics": {"source": "Prometheus", "prometheusURL": "prometheus:9090"}}),
        "spec.autoscaling.metrics",
        "http://",
    ),
    (
        _with("autoscaling", {"intervalSeconds": 120, "cooldownSeconds": 60}),
        "spec.autoscaling",
        "at least one interval",
    ),
    (_with("autoscaling", {"maxGPUs": 16}), "spec", "autoscaling.maxGPUs"),
    (_with("worker", {"grpcPort": 9090, "metricsPort": 9090}), "spec.worker", "different ports"),
    (_with("worker", {"env": [{"name": "1BAD", "value": "x"}]}), "spec.worker.env[0].name", "pattern"),
    (_with("worker", {"grpcPort": 65000}), "spec.worker", "rank ports"),
    (_with("worker", {"grpcPort": 50051, "metricsPort": 51060}), "spec.worker", "another metricsPort"),
    (_with("engine", {"decodeMaxBatch": 0}), "spec.engine.decodeMaxBatch", "at least 1"),
    (_with("engine", {"prefillTokenBudget": "2k"}), "spec.engine.prefillTokenBudget", "whole number"),
    (
        _with("planner", {"pin": {"prefill": {"tp": 2, "pp": 1, "replicas": 1}}}),
        "spec.planner.pin.decode",
        "add this required field",
    ),
    (
        _with(
            "planner", {"pin": {"prefill": {"tp": 2, "pp": 1}, "decode": {"tp": 1, "pp": 1, "replicas": 1}}}
        ),
        "spec.planner.pin.prefill.replicas",
        "add this required field",
    ),
    (
        _with(
            "planner",
            {
                "pin": {
                    "prefill": {"tp": 32, "pp": 1, "replicas": 1},
                    "decode": {"tp": 1, "pp": 1, "replicas": 1},
                }
            },
        ),
        "spec.planner.pin.prefill.tp",
        "at most 16",
    ),
    (
        _with("model.maxContextTokens", 256),
        "spec",
        "model.maxContextTokens",
    ),
    (_with("planner.profile", "opt-13b"), "spec.planner.profile", "opt-13b-a100-80gb-distserve"),
    (
        _with("router.auth", {"apiKeySecretRef": {"name": "", "key": "keys"}}),
        "spec.router.auth.apiKeySecretRef.name",
        "non-empty",
    ),
    (
        _with("router.auth", {"apiKeySecretRef": {"name": "llm-keys", "key": ""}}),
        "spec.router.auth.apiKeySecretRef.key",
        "non-empty",
    ),
    (
        _with("planner", {"profile": "opt-13b-a100-80gb-distserve", "profileConfigMap": "mine"}),
        "spec.planner",
        "remove one",
    ),
]


@pytest.mark.parametrize(
    ("spec", "field", "fix"), INVALID, ids=[f"{i:02d}-{c[1]}" for i, c in enumerate(INVALID)]
)
def test_invalid_spec_names_field_and_fix(spec: dict[str, Any], field: str, fix: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    lines = info.value.problems
    matching = [line for line in lines if line.startswith(field + ":")]
    assert matching, f"no message names {field}: {lines}"
    assert any(fix in line for line in matching), f"no fix mentioning {fix!r} in {matching}"


def test_at_least_twenty_distinct_invalid_specs() -> None:
    assert len({c[1] + c[2] for c in INVALID}) >= 20


def test_all_problems_reported_at_once() -> None:
    spec = _with("slo", {"ttftMillis": -1, "tpotMillis": -1})
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert {line.split(":")[0] for line in info.value.problems} == {
        "spec.slo.ttftMillis",
        "spec.slo.tpotMillis",
    }


def test_defaults_and_quantities() -> None:
    spec = parse_spec(VALID)
    assert spec.workload.requests_per_second == 10.0
    assert spec.cluster.gpu_budget == 4
    assert spec.autoscaling.mode.value == "Planner"
    assert spec.workload.input_tokens.distribution is not None
    assert spec.workload.input_tokens.distribution.value == "Fixed"
    assert parse_spec(_with("workload.requestsPerSecond", "500m")).workload.requests_per_second == 0.5
    assert parse_spec(_with("workload.requestsPerSecond", "0.25")).workload.requests_per_second == 0.25
    lognormal = parse_spec(_with("workload.inputTokens", {"mean": 700, "p90": 1500}))
    assert lognormal.workload.input_tokens.distribution is not None
    assert lognormal.workload.input_tokens.distribution.value == "LogNormal"


def test_engine_and_pin_defaults() -> None:
    spec = parse_spec(VALID)
    assert spec.engine.prefill_token_budget == 2048
    assert spec.engine.decode_max_batch is None  # the planner picks the device's default
    assert spec.planner.pin is None
    pinned = parse_spec(
        _with(
            "planner",
            {
                "pin": {
                    "prefill": {"tp": 2, "pp": 1, "replicas": 1},
                    "decode": {"tp": 1, "pp": 2, "replicas": 3},
                }
            },
        )
    )
    assert pinned.planner.pin is not None and pinned.planner.pin.decode.replicas == 3


def test_wire_form_is_camel_case_round_trip() -> None:
    spec = parse_spec(VALID)
    wire = spec.to_wire()
    assert wire["slo"] == {"ttftMillis": 200, "tpotMillis": 100, "attainmentPercent": 90}
    assert "gpusPerNode" in wire["cluster"]
    assert parse_spec(wire) == spec


def test_resource_metadata_name_checked() -> None:
    with pytest.raises(SpecError) as info:
        parse_resource(
            {
                "apiVersion": "distserve.io/v1alpha1",
                "kind": "DistServeDeployment",
                "metadata": {"name": "Bad_Name"},
                "spec": VALID,
            }
        )
    assert any(line.startswith("metadata.name:") for line in info.value.problems)
    # Worker StatefulSet names add the role, revision and stage; their pods' labels must fit 63.
    with pytest.raises(SpecError) as info:
        parse_resource(
            {
                "apiVersion": "distserve.io/v1alpha1",
                "kind": "DistServeDeployment",
                "metadata": {"name": "a-very-long-deployment-name-for-llama"},
                "spec": VALID,
            }
        )
    assert any("use at most 32 characters" in line for line in info.value.problems), info.value.problems


def test_examples_load(repo_root: Any = None) -> None:
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "deploy" / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        assert load_manifest(path).metadata.name


def test_serving_mode_defaults_to_disaggregated_and_takes_the_three_modes() -> None:
    assert parse_spec(VALID).serving.mode.value == "Disaggregated"
    for mode in ("Auto", "Disaggregated", "Colocated"):
        assert parse_spec(_with("serving", {"mode": mode})).serving.mode.value == mode
    with pytest.raises(SpecError) as info:
        parse_spec(_with("serving", {"mode": "Colocate"}))
    assert any(line.startswith("spec.serving.mode:") and "Colocated" in line for line in info.value.problems)


def test_colocated_mode_refuses_a_prefill_decode_pin_naming_both_fields() -> None:
    pin = {"prefill": {"tp": 1, "pp": 1, "replicas": 1}, "decode": {"tp": 1, "pp": 1, "replicas": 1}}
    spec = _with("serving", {"mode": "Colocated"})
    spec["planner"] = {"pin": pin}
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    text = "\n".join(info.value.problems)
    assert "planner.pin" in text and "serving.mode" in text and "remove planner.pin" in text
    auto = _with("serving", {"mode": "Auto"})
    auto["planner"] = {"pin": pin}
    assert parse_spec(auto).planner.pin is not None  # Auto with a pin runs the pin


def test_planner_profile_is_a_bundled_name_and_not_with_a_configmap() -> None:
    assert parse_spec(_with("planner.profile", "opt-66b-a100-80gb-vllm")).planner.profile is not None
    with pytest.raises(SpecError) as info:
        parse_spec(_with("planner.profile", "opt-13b.json"))
    (line,) = info.value.problems
    # The field, every bundled name, and where a profile of one's own goes.
    assert line.startswith("spec.planner.profile: not a bundled profile")
    for name in ("opt-13b-a100-80gb-distserve", "opt-13b-a100-80gb-vllm", "opt-66b-a100-80gb-distserve"):
        assert name in line
    assert "profileConfigMap" in line
    with pytest.raises(SpecError) as info:
        parse_spec(_with("planner", {"profile": "opt-13b-a100-80gb-distserve", "profileConfigMap": "mine"}))
    (line,) = info.value.problems
    assert (
        "planner.profile (opt-13b-a100-80gb-distserve)" in line and "planner.profileConfigMap (mine)" in line
    )
    assert "remove one" in line
