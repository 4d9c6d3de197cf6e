"""Pipeline stages: the cost-balanced layer split, how PP is priced, and the split reaching the workers."""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from distserve_operator import api, contract
from distserve_planner import plan_deployment, stages
from distserve_planner.architecture import CATALOGUE
from distserve_planner.hardware import BUILTIN
from distserve_planner.latency import InstanceTiming, analytical_coefficients, stage_hop

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
SMOLLM2 = CATALOGUE["smollm2-135m"]
OPT13 = CATALOGUE["opt-13b"]
A100 = BUILTIN[api.GpuType.A100_80GB]
NVLINK = 300e9


def _compositions(n: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to cut n layers into `parts` contiguous stages of at least one layer."""
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield tuple(b - a for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("seed", range(60))
def test_split_is_contiguous_complete_and_optimal_against_enumeration(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    pp = rng.randint(1, min(4, n))
    costs = [rng.choice([0.0, 1.0, rng.uniform(0, 5)]) for _ in range(n)]
    first, last = rng.uniform(0, 6), rng.uniform(0, 12)
    split = stages.balanced_split(costs, pp, first, last)
    # Contiguous counts: every layer once, in order, each stage at least one layer.
    assert len(split) == pp and sum(split) == n and min(split) >= 1
    every = [stages.stage_costs(c, costs, first, last) for c in _compositions(n, pp)]
    best = min(max(c) for c in every)
    ours = stages.stage_costs(split, costs, first, last)
    assert max(ours) == pytest.approx(best, rel=1e-9, abs=1e-12)
    # Of the optimal splits, the most even one.
    evenest = min(sum(x * x for x in c) for c in every if max(c) <= best * (1 + 1e-9) + 1e-12)
    assert sum(x * x for x in ours) == pytest.approx(evenest, rel=1e-9, abs=1e-12)


def test_ties_on_the_busiest_stage_go_to_the_evenest_split() -> None:
    assert sorted(stages.balanced_split([1.0] * 10, 4), reverse=True) == [3, 3, 2, 2]
    assert stages.prefill_split(SMOLLM2, 4, 512, 512**2).layers == (8, 8, 7, 7)


def test_split_refuses_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="pp 4"):
        stages.balanced_split([1.0, 1.0, 1.0], 4)


def test_smollm2_decode_gives_the_last_stage_fewer_layers_for_its_lm_head() -> None:
    # The LM head, 49152 x 576 weights, reads as much as ~8 of the 30 layers in every decode step.
    split = stages.decode_split(SMOLLM2, 2, rows=1, context=100)
    assert split.layers == (19, 11)
    assert split.share == pytest.approx(0.5, abs=0.02)
    # Prefill computes logits only at a prompt's last position: the head is cheap, the split even.
    assert stages.prefill_split(SMOLLM2, 2, 64, 64 * 64).layers == (15, 15)
    # Under load the KV read on every layer outweighs the head, and the split evens out.
    loaded = stages.decode_split(SMOLLM2, 2, rows=128, context=1000).layers
    assert loaded[1] > 11 and sum(loaded) == 30


def _timing(pp: int, arch: Any = OPT13) -> InstanceTiming:
    coeff = analytical_coefficients(arch, A100, 1, NVLINK)
    hop_ms, per_token = stage_hop(arch, NVLINK)
    if pp == 1:
        return InstanceTiming(coeff, 1)
    share = stages.decode_split(arch, pp, rows=32, context=600).share
    return InstanceTiming(coeff, pp, hop_ms, per_token, decode_share=share)


def _per_token_ms(timing: InstanceTiming, batch: int, context: int = 600) -> float:
    a, b, c = timing.decode_abc(batch)
    return a + b * batch * context + c * batch


def test_decode_pipeline_costs_hops_at_batch_one_and_gains_from_micro_batches() -> None:
    one, two = _timing(1), _timing(2)
    hop_ms, per_token = stage_hop(OPT13, NVLINK)
    # One request: one micro-batch, nothing overlaps, so PP2 is PP1 plus two hops (the hidden
    # state forward, the token id back).
    assert _per_token_ms(two, 1) == pytest.approx(_per_token_ms(one, 1) + 2 * hop_ms + per_token)
    assert _per_token_ms(two, 1) > _per_token_ms(one, 1)
    # From a batch of PP on, two micro-batches are in flight and each request's token is cheaper,
    # once the per-request work they split outweighs the hops: every micro-batch still reads all
    # the weights, so on a memory-bound GPU two requests (0.4 ms of per-request work) do not.
    for batch in (8, 64, 256):
        assert _per_token_ms(two, batch) < _per_token_ms(one, batch), batch
    assert _per_token_ms(two, 2) > _per_token_ms(one, 2)
    # On a CPU decode is compute-bound: a batch of PP already gains.
    cpu = BUILTIN[api.GpuType.CPU]
    coeff = analytical_coefficients(SMOLLM2, cpu, 1, NVLINK)
    hop = stage_hop(SMOLLM2, NVLINK)
    share = stages.decode_split(SMOLLM2, 2, rows=1, context=600).share
    cpu_two = InstanceTiming(coeff, 2, *hop, decode_share=share)
    assert _per_token_ms(cpu_two, 2) < _per_token_ms(InstanceTiming(coeff, 1), 2)


def test_an_uneven_split_slows_the_decode_round() -> None:
    coeff = analytical_coefficients(OPT13, A100, 1, NVLINK)
    even = InstanceTiming(coeff, 2, 0.1, 0.0, decode_share=0.5)
    lopsided = InstanceTiming(coeff, 2, 0.1, 0.0, decode_share=0.6)
    assert _per_token_ms(lopsided, 64) == pytest.approx(1.2 * (_per_token_ms(even, 64) - 0.2) + 0.2)
    assert _per_token_ms(lopsided, 1) == _per_token_ms(even, 1)  # one micro-batch waits on nobody


def test_prefill_pipeline_pays_hops_of_the_batch_and_frees_after_the_busiest_share() -> None:
    coeff = analytical_coefficients(OPT13, A100, 1, NVLINK)
    hop_ms, per_token = stage_hop(OPT13, NVLINK)
    t = coeff.prefill_ms(2048, 4 * 512**2)
    pp4 = InstanceTiming(coeff, 4, hop_ms, per_token, prefill_share=0.3)
    latency, busy = pp4.prefill(2048, 4 * 512**2)
    assert latency == pytest.approx(t + 3 * (hop_ms + 2048 * per_token))
    assert busy == pytest.approx(0.3 * t + hop_ms + 2048 * per_token)


def _manifest(name: str, **spec: Any) -> api.DistServeDeployment:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["spec"] = {**doc["spec"], **copy.deepcopy(spec)}
    return api.parse_resource(doc)


def _pp2_pin() -> dict[str, Any]:
    phase = {"tp": 1, "pp": 2, "replicas": 1}
    return {"pin": {"prefill": phase, "decode": phase}}


def test_a_pinned_pp2_plan_carries_its_split_to_the_contract() -> None:
    dsd = _manifest(
        "local-smollm2.yaml",
        planner=_pp2_pin(),
        cluster={"gpu": {"type": "CPU"}, "gpusPerNode": 4, "nodes": 1},
    )
    report = plan_deployment(dsd)
    p = report.plan
    layers = 30  # SmolLM2-135M, whichever source the planner read it from
    for phase in (p.prefill, p.decode):
        assert phase.stage_layers is not None and len(phase.stage_layers) == 2
        assert sum(phase.stage_layers) == layers and min(phase.stage_layers) >= 1
    assert p.decode.stage_layers is not None and p.decode.stage_layers[1] < p.decode.stage_layers[0]
    assert "layers 19+11" in report.table()
    # The plan status round-trips (wire format) and the contract's stage ranges are the split.
    wired = api.PlanStatus.model_validate(p.to_wire())
    c = contract.runtime_contract(dsd.spec, wired)
    for phase_plan, phase_contract in ((p.prefill, c.prefill), (p.decode, c.decode)):
        assert phase_plan.stage_layers is not None
        ranges = [(s.layers.start, s.layers.end) for s in phase_contract.stages]
        first = phase_plan.stage_layers[0]
        assert ranges == [(0, first), (first, layers)]


def test_pp1_plans_leave_the_split_out() -> None:
    p = plan_deployment(_manifest("opt-13b-a100x4.yaml", planner=_pin(1, 1))).plan
    assert p.prefill.stage_layers is None and p.decode.stage_layers is None
    assert "stageLayers" not in p.to_wire()["decode"]


def _pin(prefill_pp: int, decode_pp: int) -> dict[str, Any]:
    return {
        "pin": {
            "prefill": {"tp": 1, "pp": prefill_pp, "replicas": 1},
            "decode": {"tp": 1, "pp": decode_pp, "replicas": 1},
        }
    }


def test_searched_pipelines_carry_their_split() -> None:
    doc = yaml.safe_load((EXAMPLES / "opt-66b-a100-4x8-low.yaml").read_text())
    # Nodes of 4 GPUs at 25 GB/s: pipelines across nodes pay here.
    doc["spec"]["cluster"]["interconnect"]["interNodeGBps"] = 25
    doc["spec"]["cluster"]["gpusPerNode"], doc["spec"]["cluster"]["nodes"] = 4, 8
    p = plan_deployment(api.parse_resource(doc)).plan
    assert p.prefill.pp > 1 and p.decode.pp > 1
    for phase in (p.prefill, p.decode):
        assert phase.stage_layers is not None and sum(phase.stage_layers) == 64
        assert len(phase.stage_layers) == phase.pp
