"""The planner's side of the fidelity benchmark: the same requests through the planner's own
simulator with a fitted profile, for one disaggregated or colocated configuration, and the
goodput (highest rate meeting the attainment target) by bisection over the rate."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distserve_operator import api
from distserve_planner import hardware, profiles, search
from distserve_planner import simulator as sim
from distserve_planner.latency import InstanceTiming, kv_transfer_ms, stage_hop
from distserve_planner.loaders import architecture, profile_files
from distserve_planner.workload import Requests


@dataclass(frozen=True)
class Predicted:
    ttft_ms: list[float]
    tpot_ms: list[float]

    def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
        return sim.joint_attainment(self.ttft_ms, self.tpot_ms, ttft_slo, tpot_slo)


@dataclass(frozen=True)
class Engine:
    """The worker limits both sides use: the simulator simulates them, the real stack is started
    with them (`stack_args`)."""

    # Prompt tokens per prefill forward, padding counted. 512 rather than the worker's 2,048:
    # on a CPU core a forward is compute-bound from ~64 tokens on, so a bigger batch adds latency
    # (a 2,048-token forward takes ~4 s here) and almost no throughput.
    token_budget: int = 512
    max_batch: int = 32  # the decode worker's default --max-batch
    kv_tokens: int = 65536  # the decode worker's default --max-kv-tokens

    def prefill_args(self) -> list[str]:
        return ["--token-budget", str(self.token_budget)]

    def decode_args(self) -> list[str]:
        return ["--max-batch", str(self.max_batch), "--max-kv-tokens", str(self.kv_tokens)]

    def describe(self) -> dict[str, int]:
        return {
            "prefillTokenBudget": self.token_budget,
            "decodeMaxBatch": self.max_batch,
            "decodeMaxKvTokens": self.kv_tokens,
        }


@dataclass(frozen=True)
class ModelSide:
    timing: InstanceTiming
    transfer_ms: Callable[[int], float]
    engine: Engine = Engine()
    # Decode with pipeline stages: the planner's timing for them (`timing` otherwise), and its split.
    decode_timing: InstanceTiming | None = None
    decode_split: tuple[int, ...] = ()

    @staticmethod
    def load(
        profile_path: str | Path,
        spec: api.DistServeDeploymentSpec,
        engine: Engine = Engine(),
        decode_pp: int = 1,
        requests: Requests | None = None,
    ) -> ModelSide:
        """With `decode_pp` > 1, decode as the planner prices PP stages on one node: its hop (the
        intra-node link, `stage_hop`) and its cost-balanced split for these `requests` at the
        engine's batch limit (`search.decode_stages`), the split the stack then runs."""
        profile = profile_files.load(profile_path, spec.model.name)
        latency = profiles.latency_model(profile)
        timing = latency.instance(1, 1)
        if timing is None:
            raise ValueError(f"{profile_path} has no TP1xPP1 entry")
        arch = architecture.resolve(spec.model)
        links = hardware.Links.from_spec(spec.cluster.interconnect)
        decode_timing, split = None, ()
        if decode_pp > 1:
            assert requests is not None, "the split is balanced for the workload's requests"
            stages = search.decode_stages(arch, requests, decode_pp, engine.max_batch)
            assert stages is not None
            piped = latency.instance(
                1, decode_pp, *stage_hop(arch, links.intra_node, hardware.from_gpu_spec(spec.cluster.gpu))
            )
            assert piped is not None
            decode_timing, split = search.with_stages(piped, decode=stages), stages.layers
        return ModelSide(
            timing,
            lambda tokens: kv_transfer_ms(arch, tokens, links.intra_node, 1),
            engine,
            decode_timing,
            split,
        )

    def disaggregated(
        self, prefill: int, decode: int, arrivals_s: list[float], inputs: list[int], outputs: list[int]
    ) -> Predicted:
        out = sim.simulate_disaggregated(
            [self.timing] * prefill,
            [self.decode_timing or self.timing] * decode,
            self.engine.kv_tokens,
            self.transfer_ms,
            [a * 1e3 for a in arrivals_s],
            inputs,
            outputs,
            self.engine.token_budget,
            max_batch=self.engine.max_batch,
        )
        return Predicted(out.ttft, out.tpot)

    def colocated(
        self, replicas: int, arrivals_s: list[float], inputs: list[int], outputs: list[int]
    ) -> Predicted:
        arrivals = [a * 1e3 for a in arrivals_s]
        first, last = [0.0] * len(arrivals), [0.0] * len(arrivals)
        for k in range(replicas):
            idx = list(range(k, len(arrivals), replicas))
            f, la = sim.simulate_colocated(
                self.timing,
                [arrivals[i] for i in idx],
                [inputs[i] for i in idx],
                [outputs[i] for i in idx],
                self.engine.kv_tokens,
                self.engine.token_budget,
                self.engine.max_batch,
            )
            for i, a, b in zip(idx, f, la, strict=True):
                first[i], last[i] = a, b
        return Predicted(
            [f - a for f, a in zip(first, arrivals, strict=True)], sim.tpot(first, last, outputs)
        )


def goodput(
    attainment_at: Callable[[float], float], target: float, high: float, iterations: int = 24
) -> float:
    """Highest rate with attainment >= target, by bisection in (0, high]."""
    lo, hi = 0.0, high
    if attainment_at(hi) >= target:
        return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if attainment_at(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def interpolated_goodput(rates: list[float], attainments: list[float], target: float) -> float | None:
    """Where attainment crosses the target between measured rates (linear), or None if it never does
    within them (all above: at least the highest rate; all below: under the lowest)."""
    pairs = sorted(zip(rates, attainments, strict=True))
    for (r0, a0), (r1, a1) in itertools.pairwise(pairs):
        if a0 >= target > a1:
            return r0 + (a0 - target) / (a0 - a1) * (r1 - r0)
    return None
