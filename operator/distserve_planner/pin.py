"""Pinned plans (`spec.planner.pin`): the user's parallelism and replicas, evaluated instead of chosen.

Operators of real clusters override planners (a profile they trust more, a node layout the planner
does not know). The planner then checks that the pin can run at all, simulates it like any plan, and
still runs its own search so that the verdict can say whether its own choice would be better.

A pin that cannot run (a TP that does not split the heads or is wider than a node, a PP that does not
split the layers, weights that do not fit, more GPUs than the budget) is refused before anything is
simulated: ValueError names the spec field and the fix, which the operator reports as Planned=False.
A pin that runs but misses the SLO is not an error: the report says so, as it would of any plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_operator.api import Affinity, tp_refusal

from .memory import check_fit
from .placement import Placement, summary
from .search import ClusterShape, Context, decode_rate, divisors, pipeline_bandwidth, prefill_rate

FIELD = "spec.planner.pin"
# Within this share of each other two plans' goodput per GPU count as on a par (the simulator is
# not more precise than that; placement.EQUIVALENT_SHARE makes the same call).
PAR_SHARE = 0.05


@dataclass(frozen=True)
class PhaseChoice:
    tp: int
    pp: int
    replicas: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.replicas

    @property
    def label(self) -> str:
        return f"TP{self.tp}xPP{self.pp}"


@dataclass(frozen=True)
class Pin:
    prefill: PhaseChoice
    decode: PhaseChoice
    budget: int  # GPUs the deployment may use
    budget_field: str  # the spec field that sets `budget`, for the message that refuses a pin

    @property
    def gpus(self) -> int:
        return self.prefill.gpus + self.decode.gpus


def check(pin: Pin, ctx: Context, gpus_per_node: int) -> None:
    """ValueError (the field and the fix) when the pin cannot run on this model and cluster."""
    arch = ctx.arch
    within_node = [t for t in range(1, gpus_per_node + 1) if not tp_refusal(arch.heads, arch.kv_heads, t)]
    for phase, choice in (("prefill", pin.prefill), ("decode", pin.decode)):
        where = f"{FIELD}.{phase}"
        reason = tp_refusal(arch.heads, arch.kv_heads, choice.tp)
        if reason:
            raise ValueError(f"{where}.tp: {reason} (within a node: {_listed(within_node)})")
        if choice.tp > gpus_per_node:
            raise ValueError(
                f"{where}.tp: TP{choice.tp} is wider than a node's {gpus_per_node} GPUs (cluster.gpusPerNode); "
                f"tensor parallelism all-reduces every layer and stays inside a node: use a tp of "
                f"{_listed(within_node)} and raise {where}.pp instead"
            )
        if arch.layers % choice.pp:
            raise ValueError(
                f"{where}.pp: PP{choice.pp} does not divide the model's {arch.layers} layers: use a pp of "
                f"{_listed(divisors(arch.layers, arch.layers))}"
            )
        fit = check_fit(arch, ctx.device, choice.tp, choice.pp, ctx.longest_request)
        if not fit.ok:
            raise ValueError(
                f"{where}: {choice.label} cannot run: {fit.reason}; fix: raise {where}.tp or {where}.pp "
                "(more GPUs per instance), or use GPUs with more memory"
            )
        if ctx.latency.instance(choice.tp, choice.pp) is None:
            raise ValueError(
                f"{where}: the latency model has no {choice.label} ({ctx.latency.missing_reason}); fix: pin a "
                "configuration the profile covers, or profile this one (distserve profile)"
            )
    if pin.gpus > pin.budget:
        raise ValueError(
            f"{FIELD}: the pin needs {pin.gpus} GPUs (prefill {pin.prefill.replicas}×{pin.prefill.label}, decode "
            f"{pin.decode.replicas}×{pin.decode.label}), more than the {pin.budget} of {pin.budget_field}: lower "
            f"{FIELD}.prefill.replicas / {FIELD}.decode.replicas or raise {pin.budget_field}"
        )


def _listed(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def placement(pin: Pin, ctx: Context, shape: ClusterShape, affinity: Affinity) -> Placement:
    """The pin as a placement the simulator scores. It is placed as the spec asks: Low affinity
    keeps each node's prefill and decode segments together (`low_span`); anything else places
    phases independently."""
    links = ctx.links
    p, d = pin.prefill, pin.decode
    g = shape.gpus_per_node
    if affinity is Affinity.LOW:
        span = low_span(pin, shape)
        prefill = prefill_rate(ctx, p.tp, p.pp, pipeline_bandwidth(links, p.pp, span), span)
        decode = decode_rate(
            ctx, d.tp, d.pp, pipeline_bandwidth(links, d.pp, span), links.intra_node, d.tp * d.pp, span
        )
        return Placement(prefill, decode, p.replicas, d.replicas, span, "Low", links.intra_node)
    one_node = shape.budget <= g
    transfer_bw = links.intra_node if one_node else links.inter_node

    def bw(c: PhaseChoice) -> float:
        return pipeline_bandwidth(links, c.pp, -(-c.pp // max(1, g // c.tp)))

    prefill = prefill_rate(ctx, p.tp, p.pp, bw(p))
    decode = decode_rate(ctx, d.tp, d.pp, bw(d), transfer_bw, d.tp * d.pp)
    return Placement(prefill, decode, p.replicas, d.replicas, 1, "High", transfer_bw)


def low_span(pin: Pin, shape: ClusterShape) -> int:
    """Nodes a pinned Low-affinity pipeline spans: the fewest that divide both phases' stages and
    hold one segment of each per node (1 when none does: the phases then share one node's link)."""
    p, d = pin.prefill, pin.decode
    for span in range(1, shape.nodes + 1):
        if p.pp % span or d.pp % span:
            continue
        if (p.tp * p.pp + d.tp * d.pp) // span <= shape.gpus_per_node:
            return span
    return 1


def comparison(pinned: Placement, own: Placement | None, rate: float) -> str:
    """One or two sentences: the pin's goodput per GPU against the planner's own choice."""
    head = f"Pinned by spec.planner.pin: {pinned.per_gpu:.2f} req/s per GPU."
    if own is None:
        return f"{head} The planner's own search finds no configuration meeting the SLO either."
    theirs = f"the planner's own choice, {summary(own)} on {own.gpus} GPUs at {own.per_gpu:.2f} req/s per GPU"
    if own.serves(rate) and not pinned.serves(rate):
        return (
            f"{head} It does not sustain the {rate:g} req/s asked for; {theirs}, does: remove spec.planner.pin "
            "to deploy it."
        )
    if pinned.per_gpu <= 0:
        return (
            f"{head} {theirs[0].upper()}{theirs[1:]}, would be better: remove spec.planner.pin to deploy it."
        )
    gain = own.per_gpu / pinned.per_gpu - 1
    if gain > PAR_SHARE:
        return (
            f"{head} {theirs[0].upper()}{theirs[1:]}, would be better by {gain:.0%} per GPU: remove "
            "spec.planner.pin to deploy it."
        )
    if gain >= -PAR_SHARE:
        return f"{head} On a par with {theirs} ({gain:+.0%})."
    return f"{head} Better than {theirs}, by {-gain / (1 + gain):.0%} per GPU."
