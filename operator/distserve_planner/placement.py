"""Placements: which prefill and decode configurations run, how many of each, and on which nodes.

The space searched (the tests enumerate it by brute force and hold the search to its best):

- **High node affinity** (Algorithm 1): any prefill (TP, PP) with any decode (TP, PP), each phase's
  instances placed on their own. KV moves over NVLink when the whole budget fits in one node, else
  over the network; a pipeline larger than a node crosses nodes for the hops between them.
- **Low node affinity** (Algorithm 2): pipelines span `node_span` nodes, and node i holds stage
  segment i of *both* phases (the same layers), so the KV cache moves over NVLink. Inside a node,
  each phase has its own TP and its own intra-node depth k (an instance has node_span x k stages),
  and a node holds n_p prefill and n_d decode segments that need not fill it. A deployment is some
  number of such node groups, all alike.
- **Replicas, jointly with the pair.** Goodput per GPU peaks where the two phases balance, which
  is not always at the fewest replicas the rate needs: one fast prefill instance may feed three
  decode instances, and that 1:3 unit beats 1:1 per GPU even when one decode instance would serve
  the rate. So every balanced unit of a pair (Algorithm 1) and every mix of segments on a node
  (Algorithm 2) is a candidate, in as many copies (node groups) as serve the rate, or as the
  budget holds when it cannot.

The objective is the paper's, goodput per GPU, after serving the rate: `rank_key`. Plans within
5% of the best count as equal (the simulator is not more precise than that) and `choose` breaks
the tie, saying why in words: the lower TPOT p90 predicted at each plan's own goodput (at the
load it is rated for, so that a larger plan does not win by running emptier), then fewer GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from distserve_operator.api import Bottleneck

from .search import (
    ClusterShape,
    Context,
    PhaseResult,
    decode_rate,
    divisors,
    nests,
    parallel_configs,
    pipeline_bandwidth,
    prefill_rate,
    shardable_tps,
)


@dataclass(frozen=True)
class Placement:
    """A disaggregated plan: replicas of one prefill and one decode configuration."""

    prefill: PhaseResult
    decode: PhaseResult
    prefill_replicas: int
    decode_replicas: int
    node_span: int = 1
    affinity: str = "High"
    transfer_bw: float = 0.0  # bytes/s the KV cache is pulled over; 0: the intra-node link
    groups: int = 1  # Low affinity: node groups of `node_span` nodes, all holding the same segments

    @property
    def gpus(self) -> int:
        return self.prefill_replicas * self.prefill.gpus + self.decode_replicas * self.decode.gpus

    @property
    def goodput(self) -> float:
        """Requests/s the whole plan sustains: the slower phase's total."""
        return min(self.prefill_replicas * self.prefill.max_rate, self.decode_replicas * self.decode.max_rate)

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.gpus if self.gpus else 0.0

    @property
    def instances(self) -> int:
        return self.prefill_replicas + self.decode_replicas

    @property
    def shape(self) -> tuple[int, ...]:
        return (
            self.prefill.tp,
            self.prefill.pp,
            self.prefill_replicas,
            self.decode.tp,
            self.decode.pp,
            self.decode_replicas,
            self.node_span,
        )

    @property
    def bottleneck(self) -> Bottleneck:
        if self.prefill_replicas * self.prefill.max_rate <= self.decode_replicas * self.decode.max_rate:
            return Bottleneck.TTFT
        return self.decode.bottleneck

    def serves(self, rate: float) -> bool:
        return self.goodput >= rate * 0.999

    def grown(self, phase: str, gpus_per_node: int) -> Placement | None:
        """One more instance of `phase` (High), or one more of its segments on every node (Low);
        None when a node has no room for it."""
        if phase == "prefill":
            bigger = replace(self, prefill_replicas=self.prefill_replicas + self.groups)
        else:
            bigger = replace(self, decode_replicas=self.decode_replicas + self.groups)
        if self.affinity == "Low":
            per_node = (
                bigger.prefill_replicas * self.prefill.gpus + bigger.decode_replicas * self.decode.gpus
            ) // (self.groups * self.node_span)
            if per_node > gpus_per_node:
                return None
        return bigger


def layers_text(stage_layers: list[int] | None) -> str:
    """ " layers 19+11" for a plan's pipeline split, "" without one."""
    return " layers " + "+".join(str(n) for n in stage_layers) if stage_layers else ""


def summary(p: Placement) -> str:
    return (
        f"prefill TP{p.prefill.tp}xPP{p.prefill.pp}{layers_text(p.prefill.stage_layers)} ×{p.prefill_replicas} | "
        f"decode TP{p.decode.tp}xPP{p.decode.pp}{layers_text(p.decode.stage_layers)} ×{p.decode_replicas}"
    )


# ---------------------------------------------------------------------------- replica counts


def needed(rate: float, per_instance: float) -> int:
    """Instances of `per_instance` req/s that serve `rate` (at least one)."""
    return max(1, math.ceil(rate / per_instance - 1e-9))


def replica_options(
    rate: float, rp: float, rd: float, gp: int, gd: int, budget: int
) -> Iterator[tuple[int, int]]:
    """Prefill and decode replicas of one pair (per-instance rates rp, rd; GPUs gp, gd) worth
    scoring. Goodput per GPU, min(n rp, m rd) / (n gp + m gd), peaks where the phases balance:
    for n prefill instances, at m = floor or ceil of n rp / rd decode ones (more decode adds GPUs
    and no goodput, fewer leaves prefill idle), and likewise the other way round. Every such
    balanced unit within the budget is a candidate, as many copies of it as serve `rate` (all the
    budget holds when that is fewer), and so is the fewest of each phase that serves `rate`."""
    seen: set[tuple[int, int]] = set()

    def deployed(n: int, m: int) -> tuple[int, int] | None:
        gpus, goodput = n * gp + m * gd, min(n * rp, m * rd)
        if n < 1 or m < 1 or gpus > budget:
            return None
        copies = min(needed(rate, goodput), budget // gpus)
        return n * copies, m * copies

    units = [(needed(rate, rp), needed(rate, rd))]
    for n in range(1, budget // gp + 1):
        units += [(n, math.floor(n * rp / rd)), (n, math.ceil(n * rp / rd))]
    for m in range(1, budget // gd + 1):
        units += [(math.floor(m * rd / rp), m), (math.ceil(m * rd / rp), m)]
    for n, m in units:
        plan = deployed(n, m)
        if plan is not None and plan not in seen:
            seen.add(plan)
            yield plan


# ---------------------------------------------------------------------------- the two algorithms


def high_affinity(
    ctx: Context, shape: ClusterShape, rate: float
) -> tuple[list[Placement], list[PhaseResult]]:
    """Algorithm 1: each phase's instances placed independently."""
    one_node = shape.budget <= shape.gpus_per_node
    links = ctx.links
    transfer_bw = links.intra_node if one_node else links.inter_node
    configs = list(
        parallel_configs(ctx.arch, shardable_tps(ctx, shape.gpus_per_node), shape.budget, shape.budget)
    )

    def stage_bw(tp: int, pp: int) -> float:
        # Stages fill a node before the next: only the hops between nodes cross the network.
        per_node = max(1, shape.gpus_per_node // tp)
        return pipeline_bandwidth(links, pp, math.ceil(pp / per_node))

    prefills = [prefill_rate(ctx, tp, pp, stage_bw(tp, pp)) for tp, pp in configs]
    decodes = [decode_rate(ctx, tp, pp, stage_bw(tp, pp), transfer_bw, tp * pp) for tp, pp in configs]
    plans = [
        Placement(p, d, n, m, 1, "High", transfer_bw)
        for p in prefills
        if p.max_rate > 0
        for d in decodes
        if d.max_rate > 0
        for n, m in replica_options(rate, p.max_rate, d.max_rate, p.gpus, d.gpus, shape.budget)
    ]
    return plans, prefills + decodes


@dataclass(frozen=True)
class NodeShape:
    """One phase's segment on a node under Algorithm 2: TP and the stages it holds there (k)."""

    tp: int
    k: int

    @property
    def gpus(self) -> int:
        return self.tp * self.k


def segment_shapes(ctx: Context, shape: ClusterShape, span: int) -> list[NodeShape]:
    """Every (TP, intra-node depth) a node segment can take on pipelines spanning `span` nodes:
    the pipeline's span x k stages must divide the layers, split evenly over the nodes."""
    g = shape.gpus_per_node
    out = []
    for tp in shardable_tps(ctx, g):
        for k in range(1, g // tp + 1):
            pp = span * k
            if ctx.arch.layers % pp == 0 and nests(ctx.arch, ctx.requests, pp, span):
                out.append(NodeShape(tp, k))
    return out


def node_contents(
    g: int, fp: int, fd: int, rp: float, rd: float, rate: float, groups: Callable[[int], int]
) -> Iterator[tuple[int, int, int]]:
    """(prefill segments, decode segments, node groups) for nodes of `g` GPUs holding segments of
    `fp` and `fd` GPUs: every mix that fits a node, in as many groups as serve `rate` (all that
    `groups(gpus per node)` allows when that is fewer)."""
    for a in range(1, (g - fd) // fp + 1):
        for b in range(1, (g - a * fp) // fd + 1):
            most = groups(a * fp + b * fd)
            if most >= 1:
                yield a, b, min(most, needed(rate, min(a * rp, b * rd)))


def low_affinity(ctx: Context, shape: ClusterShape, rate: float) -> tuple[list[Placement], list[PhaseResult]]:
    """Algorithm 2: for every cross-node stage count, every pair of node segments and every mix of
    them on a node."""
    plans: list[Placement] = []
    seen: list[PhaseResult] = []
    g = shape.gpus_per_node
    links = ctx.links
    for span in divisors(ctx.arch.layers, shape.nodes):
        node_shapes = segment_shapes(ctx, shape, span)

        def groups(per_node: int, span: int = span) -> int:
            """Node groups of `span` nodes, each node using `per_node` GPUs, the cluster holds."""
            return min(shape.nodes // span, shape.budget // (per_node * span))

        def bw(s: NodeShape, span: int = span) -> float:
            return pipeline_bandwidth(links, span * s.k, span)

        prefills = [(s, prefill_rate(ctx, s.tp, span * s.k, bw(s), span)) for s in node_shapes]
        decodes = [
            (s, decode_rate(ctx, s.tp, span * s.k, bw(s), links.intra_node, s.tp * span * s.k, span))
            for s in node_shapes
        ]
        seen += [r for _, r in prefills] + [r for _, r in decodes]
        for sp, p in prefills:
            for sd, d in decodes:
                if p.max_rate <= 0 or d.max_rate <= 0 or sp.gpus + sd.gpus > g:
                    continue
                for a, b, use in node_contents(g, sp.gpus, sd.gpus, p.max_rate, d.max_rate, rate, groups):
                    plans.append(Placement(p, d, a * use, b * use, span, "Low", links.intra_node, use))
    return plans, seen


# ---------------------------------------------------------------------------- choosing


def rank_key(p: Placement, rate: float) -> tuple[bool, float, int]:
    """Plans serving the workload's rate first, then goodput per GPU (the paper's objective)."""
    return (p.serves(rate), p.per_gpu, -p.gpus)


# Plans within this share of the best goodput per GPU count as equally good: the simulator is
# not more precise than that. Among them the lower predicted TPOT p90 wins (a TPOT within this
# share of the lowest counts as as low), then the fewer GPUs, then the fewer instances.
EQUIVALENT_SHARE = 0.95
# The tie is broken by simulating each plan in it: at most this many, the best per GPU first.
MAX_TIED = 8


@dataclass(frozen=True)
class Choice:
    """The ranked plans (the chosen first) and why the first won, in words."""

    plans: list[Placement]
    reason: str


def choose(
    plans: Sequence[Placement], rate: float, tpot_p90: Callable[[Placement], float], *, tie: bool = True
) -> Choice:
    """`plans` ranked by `rank_key`, the tie among the best broken (`EQUIVALENT_SHARE`) with
    `tpot_p90`, a plan's predicted TPOT p90 at the workload's rate (`tie` False: ranked only)."""
    ranked = _distinct(sorted(plans, key=lambda pl: rank_key(pl, rate), reverse=True))
    if not ranked or not tie:
        return Choice(ranked, "")
    best = ranked[0]
    tied = [
        p
        for p in ranked
        if p.serves(rate) == best.serves(rate) and p.per_gpu >= EQUIVALENT_SHARE * best.per_gpu
    ]
    if not best.serves(rate):
        # The budget cannot serve the rate: of the tied, those serving the most of it.
        most = max(p.goodput for p in tied)
        tied = [p for p in tied if p.goodput >= EQUIVALENT_SHARE * most]
    tied = tied[:MAX_TIED]
    if len(tied) == 1:
        reason = f"best goodput per GPU ({best.per_gpu:.2f} req/s), more than 5% ahead of the next plan"
        if len(ranked) == 1:
            reason = "the only plan"
        return Choice(ranked, reason)
    tpot = {id(p): tpot_p90(p) for p in tied}
    lowest = min(tpot.values())
    low = [p for p in tied if tpot[id(p)] <= lowest / EQUIVALENT_SHARE]
    chosen = min(low, key=lambda p: (p.gpus, p.instances, -p.per_gpu))
    others = [tpot[id(p)] for p in tied if p is not chosen]
    head = f"{len(tied)} plans within 5% of the best goodput per GPU ({best.per_gpu:.2f} req/s)" + (
        "" if best.serves(rate) else " and of the most goodput the budget allows"
    )
    if len(low) == 1:
        reason = (
            f"{head}; this one has the lowest predicted TPOT p90 ({lowest:.1f} ms; the others "
            f"{min(others):.1f}-{max(others):.1f} ms)"
        )
    else:
        reason = (
            f"{head}; {len(low)} of them within 5% of the lowest predicted TPOT p90 ({lowest:.1f} ms), "
            f"and this one uses the fewest GPUs ({chosen.gpus})"
        )
    return Choice([chosen] + [p for p in ranked if p is not chosen], reason)


def _distinct(plans: list[Placement]) -> list[Placement]:
    """The same shape found twice (Low on one node, say) is one candidate."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for p in plans:
        key = (*p.shape, p.affinity)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
