"""The router's `GET /v1/distserve/instances` on a real local stack (separate processes, real gRPC,
a tiny Llama): both instances listed with their role, parallelism and the model's full layer range."""

import urllib.request

import pytest

from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.local.topology import fetch_topology, format_topology
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.tiny import save_tiny_model


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = save_tiny_model("llama", tmp_path_factory.mktemp("llama"))  # 2 layers
    with LocalStack(StackConfig(ModelSpec(name="tiny-llama", kind="Path", path=str(path)), threads=1)) as s:
        s.wait_ready(180)
        yield s


def test_instances_lists_both_roles_with_their_layers(stack):
    doc = fetch_topology(stack.url, expect=2, timeout=30)
    assert doc["model"] == "tiny-llama"
    listed = {i["role"]: i for i in doc["instances"]}
    assert sorted(listed) == ["decode", "prefill"] and len(doc["instances"]) == 2
    assert listed["prefill"]["address"] == stack.prefill_addresses[0]
    assert listed["decode"]["address"] == stack.decode_addresses[0]
    for inst in listed.values():
        assert inst["ready"] and inst["reachable"] and inst["error"] == ""
        assert (inst["tp"], inst["pp"], inst["stage"]) == (1, 1, 0)
        assert inst["layers"] == {"start": 0, "end": 2}
        assert [r["rank"] for r in inst["ranks"]] == [0]
        rank = inst["ranks"][0]
        assert rank["ready"] and rank["parameters"] > 0 and rank["device"]
        assert rank["kv_heads"] == {"start": 0, "end": 2}
    assert listed["decode"]["ranks"][0]["kv_capacity_tokens"] > 0
    table = format_topology(doc)
    assert "prefill" in table and "decode" in table and "[0, 2)" in table


def test_readyz_and_instances_agree(stack):
    with urllib.request.urlopen(f"{stack.url}/readyz", timeout=5) as response:
        assert response.status == 200
    doc = fetch_topology(stack.url, expect=2, timeout=5)
    assert doc["ready"] == {"prefill": 1, "decode": 1}
