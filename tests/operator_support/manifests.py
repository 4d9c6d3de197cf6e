"""DistServeDeployment bodies for operator tests."""

from __future__ import annotations

import copy
from typing import Any

BASE_SPEC: dict[str, Any] = {
    # In the planner's catalogue; at 550 req/s on 8 A100s it plans 1 prefill + 2 decode instances
    # (a decode instance is held to the GPU default of 256 sequences per step), and doubling the
    # rate or tightening the SLO (TPOT 5 ms) changes the replica counts.
    "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "float16"},
    "slo": {"ttftMillis": 200, "tpotMillis": 100, "attainmentPercent": 90},
    "workload": {"requestsPerSecond": "550", "inputTokens": {"mean": 512}, "outputTokens": {"mean": 128}},
    "cluster": {
        "gpu": {"type": "A100-80GB"},
        "gpusPerNode": 8,
        "nodes": 1,
        "nodeSelector": {"nvidia.com/gpu.product": "A100-SXM4-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "placement": {"affinity": "High"},
    "autoscaling": {"mode": "Planner", "intervalSeconds": 5, "cooldownSeconds": 5, "driftPercent": 20},
}


def dsd(name: str, **spec_overrides: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": "distserve.io/v1alpha1",
        "kind": "DistServeDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }
