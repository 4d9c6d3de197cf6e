"""Simulator behaviour a user would notice: low-load latency, monotone attainment, memory waits."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest

from distserve_operator import api
from distserve_planner import simulator as sim
from distserve_planner import workload
from distserve_planner.latency import InstanceTiming, PhaseCoefficients
from distserve_planner.loaders import traces

COEFF = PhaseCoefficients((18.0, 0.1, 7e-6), ((1, (20.0, 0.0006, 0.04)), (95, (7.0, 0.0006, 0.16))))
TIMING = InstanceTiming(COEFF, 1, 0.0)
REQS = workload.generate(300, 0, workload.Lengths(512), workload.Lengths(128))


def _ms(rate: float, reqs: workload.Requests = REQS) -> list[float]:
    return [t * 1e3 for t in reqs.arrivals(rate)]


def test_low_load_ttft_is_bare_prefill() -> None:
    arrivals = _ms(0.05)
    first = sim.simulate_prefill(TIMING, arrivals, REQS.inputs, 2048)
    ttft = [f - a for f, a in zip(first, arrivals, strict=True)]
    bare = COEFF.prefill_ms(512, 512**2)
    assert statistics.median(ttft) == pytest.approx(bare, rel=0.01)
    assert sim.percentile(ttft, 90) < bare * 1.2


def test_prefill_pipeline_keeps_latency_and_adds_throughput() -> None:
    pp2 = InstanceTiming(COEFF, 2, 0.5)
    low = _ms(0.05)
    first = sim.simulate_prefill(pp2, low, REQS.inputs, 2048)
    assert statistics.median(f - a for f, a in zip(first, low, strict=True)) == pytest.approx(
        COEFF.prefill_ms(512, 512**2) + 0.5, rel=0.01
    )
    busy = _ms(18)
    one = sim.attainment(
        [f - a for f, a in zip(sim.simulate_prefill(TIMING, busy, REQS.inputs, 512), busy, strict=True)], 200
    )
    two = sim.attainment(
        [f - a for f, a in zip(sim.simulate_prefill(pp2, busy, REQS.inputs, 512), busy, strict=True)], 200
    )
    assert two > one


@pytest.mark.parametrize("phase", ["prefill", "decode", "colocated"])
def test_attainment_does_not_rise_with_rate(phase: str) -> None:
    previous = 1.0
    for rate in (1, 2, 4, 6, 8, 10, 12, 14, 17, 20, 25):
        arrivals = _ms(rate)
        if phase == "prefill":
            first = sim.simulate_prefill(TIMING, arrivals, REQS.inputs, 2048)
            value = sim.attainment([f - a for f, a in zip(first, arrivals, strict=True)], 200)
        elif phase == "decode":
            out = sim.simulate_decode(TIMING, arrivals, REQS.inputs, REQS.outputs, 40_000)
            value = sim.attainment(sim.tpot(arrivals, out.last_token, REQS.outputs), 60)
        else:
            first, last = sim.simulate_colocated(TIMING, arrivals, REQS.inputs, REQS.outputs, 65_000, 2048)
            ttft = [f - a for f, a in zip(first, arrivals, strict=True)]
            value = sim.joint_attainment(ttft, sim.tpot(first, last, REQS.outputs), 200, 100)
        assert value <= previous + 0.02, (phase, rate, value, previous)
        previous = value
    assert previous < 0.9  # and the top rate really is overload


def _decode_step_by_step(
    timing: InstanceTiming, ready: list[float], inputs: list[int], outputs: list[int], cap: int
) -> list[float]:
    """The obvious loop: one step at a time, everyone in the batch gets a token."""
    n = len(ready)
    order = sorted(range(n), key=ready.__getitem__)
    last = [math.inf] * n
    t, q, used = 0.0, 0, 0
    running: dict[int, int] = {}  # request -> tokens still to generate
    ctx: dict[int, int] = {}
    while q < n or running:
        while q < n and ready[order[q]] <= t and used + inputs[order[q]] + outputs[order[q]] <= cap:
            r = order[q]
            q += 1
            if outputs[r] <= 1:
                last[r] = ready[r]
                continue
            running[r], ctx[r] = outputs[r] - 1, inputs[r] + 1
            used += inputs[r] + outputs[r]
        if not running:
            t = max(t, ready[order[q]])
            continue
        a, b, c = timing.decode_abc(len(running))
        t += a + b * sum(ctx.values()) + c * len(running)
        for r in list(running):
            running[r] -= 1
            ctx[r] += 1
            if running[r] == 0:
                del running[r], ctx[r]
                last[r] = t
                used -= inputs[r] + outputs[r]
    return last


def test_closed_form_decode_matches_step_by_step() -> None:
    rng = random.Random(3)
    ready = sorted(rng.uniform(0, 20_000) for _ in range(120))
    inputs = [rng.randint(1, 900) for _ in ready]
    outputs = [rng.randint(1, 200) for _ in ready]
    for cap in (1200, 20_000, 10**7):
        fast = sim.simulate_decode(TIMING, ready, inputs, outputs, cap).last_token
        slow = _decode_step_by_step(TIMING, ready, inputs, outputs, cap)
        assert fast == pytest.approx(slow, rel=1e-9, abs=1e-6)


def test_requests_wait_for_decode_memory() -> None:
    arrivals = _ms(20)
    roomy = sim.simulate_decode(TIMING, arrivals, REQS.inputs, REQS.outputs, 10**7)
    tight = sim.simulate_decode(TIMING, arrivals, REQS.inputs, REQS.outputs, 640 * 8)
    assert not roomy.memory_bound and tight.memory_bound
    assert sim.percentile(sim.tpot(arrivals, tight.last_token, REQS.outputs), 90) > sim.percentile(
        sim.tpot(arrivals, roomy.last_token, REQS.outputs), 90
    )
    too_big = sim.simulate_decode(TIMING, [0.0], [600], [100], 500)
    assert too_big.last_token == [math.inf]  # can never fit: a miss, not a hang


def test_kv_transfer_delays_tpot_not_ttft() -> None:
    arrivals = _ms(2)
    plain = sim.simulate_disaggregated(
        [TIMING], [TIMING], 10**6, lambda n: 0.0, arrivals, REQS.inputs, REQS.outputs, 2048
    )
    slow = sim.simulate_disaggregated(
        [TIMING], [TIMING], 10**6, lambda n: 500.0, arrivals, REQS.inputs, REQS.outputs, 2048
    )
    assert slow.ttft == plain.ttft
    assert statistics.mean(slow.tpot) == pytest.approx(statistics.mean(plain.tpot) + 500 / 127, rel=0.05)


def test_workload_is_seeded_and_shaped() -> None:
    a = workload.generate(
        2000,
        7,
        workload.Lengths(700, 1500, None, api.LengthDistribution.LOG_NORMAL),
        workload.Lengths(200),
        api.ArrivalProcess.GAMMA,
        cv=2.0,
    )
    b = workload.generate(
        2000,
        7,
        workload.Lengths(700, 1500, None, api.LengthDistribution.LOG_NORMAL),
        workload.Lengths(200),
        api.ArrivalProcess.GAMMA,
        cv=2.0,
    )
    assert a == b
    assert statistics.mean(a.inputs) == pytest.approx(700, rel=0.1)
    assert sorted(a.inputs)[1800] == pytest.approx(1500, rel=0.1)
    gaps = [y - x for x, y in zip((0.0, *a.unit_arrivals), a.unit_arrivals, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1.0, rel=0.15)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(2.0, rel=0.2)
    assert set(a.outputs) == {200}


def test_trace_lengths(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("input_tokens,output_tokens\n100,10\n200,20\n")
    reqs = workload.generate(5, 0, workload.Lengths(1), workload.Lengths(1), trace=traces.read_trace(path))
    assert reqs.inputs == (100, 200, 100, 200, 100) and reqs.outputs == (10, 20, 10, 20, 10)
    (tmp_path / "bad.csv").write_text("prompt,completion\n1,2\n")
    with pytest.raises(ValueError, match="input_tokens,output_tokens"):
        traces.read_trace(tmp_path / "bad.csv")


def test_event_heap_order_is_fcfs() -> None:
    # Two requests ready at once are admitted in arrival order (FCFS), so the earlier one finishes first.
    out = sim.simulate_decode(TIMING, [0.0, 0.0], [10, 10], [5, 5], 15)
    assert out.last_token[0] < out.last_token[1]


def test_prefill_memory_holds_requests_waiting_for_decode() -> None:
    """A decode instance with room for 8 requests at 20 req/s: the rest wait in prefill memory."""
    arrivals = _ms(20)
    common = ([TIMING], [TIMING], 640 * 8, lambda n: 0.0, arrivals, REQS.inputs, REQS.outputs, 2048)
    roomy = sim.simulate_disaggregated(*common, prefill_kv_capacity=10**7)
    tight = sim.simulate_disaggregated(*common, prefill_kv_capacity=512 * 4)
    assert tight.memory_bound and roomy.prefill_memory_peak < 1 < tight.prefill_memory_peak


def test_a_padded_decode_batch_pays_for_its_longest_row() -> None:
    """Two requests decoding together, prompts of 10 and 100 tokens: with paged attention a step
    costs the sum of their contexts, with a padded batch twice the longer one."""
    ms_per_token = (0.0, 1.0, 0.0)
    paged = InstanceTiming(PhaseCoefficients(ms_per_token, ((1, ms_per_token),)), 1, 0.0)
    padded = InstanceTiming(PhaseCoefficients(ms_per_token, ((1, ms_per_token),), padded=True), 1, 0.0)
    ready, inputs, outputs = [0.0, 0.0], [10, 100], [3, 3]
    # Two steps each (the first token came from prefill); contexts 11+101, then 12+102.
    assert sim.simulate_decode(paged, ready, inputs, outputs, 10_000).last_token == [226.0, 226.0]
    assert sim.simulate_decode(padded, ready, inputs, outputs, 10_000).last_token == [2 * 101 + 2 * 102] * 2
    # Alone, padding costs nothing.
    alone = sim.simulate_decode(padded, [0.0], [100], [3], 10_000).last_token
    assert alone == sim.simulate_decode(paged, [0.0], [100], [3], 10_000).last_token == [101.0 + 102.0]
    # When the long one finishes, the short one stops paying for it.
    both = sim.simulate_decode(padded, ready, inputs, [4, 2], 10_000).last_token
    assert both == [202.0 + 12 + 13, 202.0]


def test_a_padded_prefill_batch_pays_for_its_longest_prompt() -> None:
    per_token = PhaseCoefficients((0.0, 1.0, 0.0), ((1, (1.0, 0.0, 0.0)),))
    packed = InstanceTiming(per_token, 1, 0.0)
    padded = InstanceTiming(
        PhaseCoefficients(per_token.prefill, per_token.decode, padded=True),
        1,
        0.0,
    )
    # Three prompts waiting together form one batch.
    arrivals, inputs = [0.0, 0.0, 0.0], [10, 100, 40]
    assert sim.simulate_prefill(packed, arrivals, inputs, 2048) == [150.0] * 3
    assert sim.simulate_prefill(padded, arrivals, inputs, 2048) == [300.0] * 3


def test_the_decode_batch_never_exceeds_the_engine_s_limit() -> None:
    """Three requests ready at once on an engine that runs at most two: the third starts when
    one of the first two leaves, exactly as the decode worker's --max-batch makes it wait."""
    step = InstanceTiming(PhaseCoefficients((0.0, 0.0, 0.0), ((1, (10.0, 0.0, 0.0)),)), 1, 0.0)
    ready, inputs = [0.0, 0.0, 0.0], [5, 5, 5]
    unlimited = sim.simulate_decode(step, ready, inputs, [3, 5, 3], 10_000).last_token
    assert unlimited == [20.0, 40.0, 20.0]
    limited = sim.simulate_decode(step, ready, inputs, [3, 5, 3], 10_000, max_batch=2).last_token
    assert limited == [20.0, 40.0, 40.0]
