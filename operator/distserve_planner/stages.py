"""Which decoder layers each pipeline stage holds: contiguous ranges that make the busiest stage as
cheap as possible.

A pipeline runs at the pace of its busiest stage, and the stages are not alike: stage 0 also does
the embedding lookup, the last stage the final norm and the LM head (vocab x hidden weights: on
SmolLM2-135M that is as much as 8 of its 30 layers). So an even split of the layers is not an even
split of the work. Costs are counted in each phase's own terms:

- decode is memory-bound: a stage's step reads its layers' weights and the KV of the micro-batch's
  context; the last stage also reads the LM head's weights, stage 0 one embedding row per request;
- prefill is compute-bound: a stage's FLOPs per prompt are its layers' matmuls and attention; the
  LM head runs only at each prompt's last position (the runtime computes no other logits) and the
  embeddings are a lookup, so both cost little.

Pure functions; `balanced_split` is exact (checked against enumeration in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .architecture import ModelArchitecture


@dataclass(frozen=True)
class StageCosts:
    """One phase's costs, in any unit: every decoder layer, and what only the end stages add."""

    layer: float
    first: float  # stage 0 only: the embeddings
    last: float  # the last stage only: the final norm and the LM head


@dataclass(frozen=True)
class StageSplit:
    layers: tuple[int, ...]  # decoder layers per stage, in order
    share: float  # the busiest stage's share of the whole model's cost (1/pp when perfectly even)


def decode_costs(arch: ModelArchitecture, rows: float, context: float) -> StageCosts:
    """Bytes one stage step reads for a micro-batch of `rows` requests of `context` tokens each."""
    kv_per_layer_token = arch.kv_bytes_per_token / arch.layers
    return StageCosts(
        layer=arch.layer_params * arch.dtype_bytes + kv_per_layer_token * rows * context,
        first=rows * arch.hidden_size * arch.dtype_bytes,
        last=arch.vocab_size * arch.hidden_size * arch.dtype_bytes,
    )


def prefill_costs(arch: ModelArchitecture, mean_input: float, mean_sq_input: float) -> StageCosts:
    """FLOPs of one prompt (mean length, mean squared length) per stage."""
    per_layer = (
        arch.flops_per_token / arch.layers * mean_input + arch.attention_flops(mean_sq_input) / arch.layers
    )
    return StageCosts(layer=per_layer, first=0.0, last=float(arch.lm_head_flops))


def stage_costs(split: Sequence[int], layer_costs: Sequence[float], first: float, last: float) -> list[float]:
    """Each stage's cost for a split of layers whose costs are `layer_costs`."""
    out, start = [], 0
    for s, count in enumerate(split):
        cost = sum(layer_costs[start : start + count])
        cost += (first if s == 0 else 0.0) + (last if s == len(split) - 1 else 0.0)
        out.append(cost)
        start += count
    return out


def balanced_split(
    layer_costs: Sequence[float], pp: int, first: float = 0.0, last: float = 0.0
) -> tuple[int, ...]:
    """Contiguous layers per stage, each stage at least one, minimising the busiest stage's cost.

    Exact: the optimum is the cost of some contiguous run of layers (with its end extras), so the
    smallest such value a split can stay within is found by bisection over all of them, each tried
    by a greedy fill. Many splits often share that optimum (30 layers in 4 stages: 8+8+8+6 and
    8+8+7+7); of those the most even one is returned (least sum of squared stage costs)."""
    n = len(layer_costs)
    if not 1 <= pp <= n:
        raise ValueError(f"pp {pp}: {n} layers split into 1 to {n} stages of at least one layer")
    if pp == 1:
        return (n,)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)

    def run(i: int, j: int) -> float:
        """Cost of layers [i, j) as a stage: its end extras when it starts or ends the model."""
        return prefix[j] - prefix[i] + (first if i == 0 else 0.0) + (last if j == n else 0.0)

    candidates = sorted({run(i, j) for i in range(n) for j in range(i + 1, n + 1)})
    # The largest candidate, the whole model, admits any split (costs are not negative), and a
    # larger bound never admits fewer splits: bisect for the smallest that admits one.
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy(run, n, pp, candidates[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    # A hair of slack: equal stages summed in another order may differ in the last bit.
    return _most_even(run, n, pp, candidates[lo] * (1 + 1e-12))


def _most_even(run: Callable[[int, int], float], n: int, pp: int, bound: float) -> tuple[int, ...]:
    """Of the splits whose every stage stays within `bound` (one exists), the one with the least
    sum of squared stage costs: a DP over (stages so far, layers covered)."""
    inf = float("inf")
    # best[k][j]: (sum of squares, where stage k starts) for k stages covering layers [0, j).
    best = [[(inf, -1)] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, -1)
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            if k == pp and j != n:
                continue
            for i in range(j - 1, k - 2, -1):
                cost = run(i, j)
                if cost > bound:
                    break  # starting earlier only adds layers: every longer stage is over too
                total = best[k - 1][i][0] + cost * cost
                if total < best[k][j][0]:
                    best[k][j] = (total, i)
    split, j = [], n
    for k in range(pp, 0, -1):
        i = best[k][j][1]
        split.append(j - i)
        j = i
    return tuple(reversed(split))


def _greedy(run: Callable[[int, int], float], n: int, pp: int, bound: float) -> tuple[int, ...] | None:
    """Front to back, each stage takes the most layers within `bound` that leave one for each
    stage after it; None when some stage cannot stay within it. A split within `bound` exists
    exactly when this finds one: each greedy stage ends no earlier than that split's."""
    split, start = [], 0
    for s in range(pp):
        left_after = pp - s - 1
        end = start + 1
        if s == pp - 1:
            end = n
        else:
            while end < n - left_after and run(start, end + 1) <= bound:
                end += 1
        if run(start, end) > bound:
            return None
        split.append(end - start)
        start = end
    return tuple(split)


@lru_cache(maxsize=4096)  # pure, and asked again for every pair the paper's method scores
def split_for(costs: StageCosts, layers: int, pp: int) -> StageSplit:
    """The balanced split of `layers` identical decoder layers, and how busy its busiest stage is."""
    layer_costs = [costs.layer] * layers
    split = balanced_split(layer_costs, pp, costs.first, costs.last)
    per_stage = stage_costs(split, layer_costs, costs.first, costs.last)
    total = sum(per_stage)
    return StageSplit(split, max(per_stage) / total if total > 0 else 1.0 / pp)


def decode_split(arch: ModelArchitecture, pp: int, rows: float, context: float) -> StageSplit:
    """Decode's split for micro-batches of `rows` requests of `context` tokens (see decode_costs)."""
    return split_for(decode_costs(arch, max(1.0, rows), context), arch.layers, pp)


def prefill_split(arch: ModelArchitecture, pp: int, mean_input: float, mean_sq_input: float) -> StageSplit:
    """Prefill's split for prompts of the workload's mean length (see prefill_costs)."""
    return split_for(prefill_costs(arch, mean_input, mean_sq_input), arch.layers, pp)


def node_segments(arch: ModelArchitecture, span: int, context: float) -> tuple[int, ...]:
    """Layers per node of a pipeline spanning `span` nodes (Algorithm 2): prefill and decode keep
    the same layers on a node, so that a request's KV cache moves between them over NVLink. The
    boundaries are balanced for decode's cost at one request of `context` tokens (weights, KV and
    the LM head), which does not depend on either phase's configuration: every prefill and decode
    pairing on those nodes shares them."""
    return split_for(decode_costs(arch, 1.0, context), arch.layers, span).layers


@lru_cache(maxsize=4096)
def nested_split(costs: StageCosts, segments: tuple[int, ...], per_segment: int) -> StageSplit:
    """`per_segment` stages inside each node segment of `segments` layers, each segment balanced on
    its own (the first segment carries the embeddings, the last the LM head)."""
    layers: list[int] = []
    per_stage: list[float] = []
    last = len(segments) - 1
    for j, count in enumerate(segments):
        first_extra = costs.first if j == 0 else 0.0
        last_extra = costs.last if j == last else 0.0
        layer_costs = [costs.layer] * count
        split = balanced_split(layer_costs, per_segment, first_extra, last_extra)
        layers += split
        per_stage += stage_costs(split, layer_costs, first_extra, last_extra)
    total = sum(per_stage)
    return StageSplit(tuple(layers), max(per_stage) / total if total > 0 else 1.0 / len(layers))
