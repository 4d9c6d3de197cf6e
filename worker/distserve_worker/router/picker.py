"""Which prefill and which decode instance a request goes to, and when an instance is saturated.
Pure: no I/O, no clock.

Only *routable* instances are picked: those that answered the last Status poll (`healthy`) and
reported themselves ready (`ready`; false while loading, draining or while one of a tensor-parallel
instance's ranks is dead, so a dead rank takes its whole instance out of rotation and the others
keep serving). An older worker that reports no topology (`tp == 0`) counts as ready once it answers.

Load is this router's own requests on an instance (exact, and current) plus what the instance last
reported beyond those (queued + running less this router's at that poll: other routers' requests).
Adding the two, rather than taking the larger, lets a slot that one of this router's requests just
freed count at once instead of at the next poll.

Saturated (no instance of the role saturated: the request goes on; every one saturated or none
routable: it waits in the router's queue, admission.py):
- decode: its load reaches `DECODE_HELD_PER_SLOT` x its batch slots (a running batch, and as many
  again waiting there for a slot, whose KV pulls then start the moment a slot frees, with no round
  trip through the router); or the KV tokens this router's requests reserve there (prompt +
  max_tokens each, what its scheduler reserves) would pass that many times its KV capacity.
- prefill: its KV buffer (the caches it holds, as last polled, plus the prompts this router has on
  it) has no room for this prompt. The buffer holds answered prompts until decode pulls them, so a
  prefill instance saturates when decode falls behind: DistServe's backpressure, seen by the router.
A request that could never fit an instance's capacity is not held back by it: the instance refuses
it with the reason.

Prefill: the least-loaded open (routable, unsaturated) instance. Decode: among open instances, those
with a free batch slot first, one in the prefill's own pod first (SharedPod), then the least loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rank:
    """One tensor-parallel rank of an instance, as its Status reported it."""

    rank: int
    device: str = ""
    parameters: int = 0
    kv_capacity_tokens: int = 0
    kv_heads: tuple[int, int] = (0, 0)  # [start, end) of the model's key/value heads
    address: str = ""
    ready: bool = False


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of an instance, as its stage 0 reported it."""

    stage: int
    layers: tuple[int, int]
    address: str = ""
    ready: bool = False
    ranks: tuple[Rank, ...] = ()


@dataclass
class Instance:
    address: str
    healthy: bool = False  # answered the last Status poll
    ready: bool = True  # what the instance says (WorkerStatus.ready; true for a worker without tp)
    queued: int = 0
    running: int = 0
    free_slots: int = 0
    max_context: int = 0
    inflight: int = 0  # this router's requests on it right now
    inflight_tokens: int = 0  # KV tokens they need there (prefill: prompt; decode: prompt + max_tokens)
    polled_inflight: int = 0  # this router's requests on it when the last poll was answered
    resident: int = 0  # decode: sequences admitted (in the batch or pulling); prefill: caches held
    kv_capacity_tokens: int = 0  # decode: KV tokens for its batch; prefill: its KV buffer, in tokens
    kv_used_tokens: int = 0  # prefill: KV buffer in use at the last poll (caches held and reserved)
    error: str = ""
    # Topology (WorkerStatus); tp == 0: not reported (an older worker, or never polled yet).
    tp: int = 0
    pp: int = 0
    stage: int = 0
    layers: tuple[int, int] | None = None  # [start, end)
    ranks: list[Rank] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)  # pipeline stages (pp > 1), stage 0 first

    @property
    def others(self) -> int:
        """Requests it reported at the last poll beyond this router's own then: other routers'."""
        return max(0, self.queued + self.running - self.polled_inflight)

    @property
    def load(self) -> int:
        return self.inflight + self.others

    @property
    def routable(self) -> bool:
        return self.healthy and self.ready


# Requests a decode instance may hold per batch slot: the running one and one waiting for the slot.
DECODE_HELD_PER_SLOT = 2


def decode_slots(inst: Instance) -> int:
    """Its batch limit: free slots plus sequences admitted, from one poll; 0 when not reported."""
    return inst.free_slots + inst.resident


def decode_saturated(inst: Instance, need: int = 0) -> bool:
    """`need`: the request's reserved KV tokens (prompt + max_tokens)."""
    slots = decode_slots(inst)
    if slots and inst.load >= DECODE_HELD_PER_SLOT * slots:
        return True
    kv = inst.kv_capacity_tokens
    if not kv or need > kv or inst.inflight_tokens == 0:
        return False
    return inst.inflight_tokens + need > DECODE_HELD_PER_SLOT * kv


def prefill_saturated(inst: Instance, need: int = 0) -> bool:
    """`need`: the prompt's tokens (its cache's size in the buffer)."""
    capacity = inst.kv_capacity_tokens
    held = inst.kv_used_tokens + inst.inflight_tokens
    if not capacity or need > capacity or held == 0:
        return False
    return held + need > capacity


def decode_room(instances: list[Instance]) -> int:
    """Requests the routable decode instances could take now before all are saturated (by slots;
    an instance that reports no slots counts none)."""
    return sum(
        max(0, DECODE_HELD_PER_SLOT * decode_slots(i) - i.load)
        for i in instances
        if i.routable and decode_slots(i)
    )


def pick_prefill(instances: list[Instance], need: int = 0) -> Instance | None:
    """`need`: the prompt's tokens. None: every instance is saturated or not routable."""
    open_ = [i for i in instances if i.routable and not prefill_saturated(i, need)]
    return min(open_, key=lambda i: (i.load, i.address)) if open_ else None


def host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def pick_decode(instances: list[Instance], near: str = "", need: int = 0) -> Instance | None:
    """`near`: the address the request's KV cache is pulled from (its prefill instance). A decode
    instance with room on that same host comes first: with `stageLayout: SharedPod` prefill and
    decode stage s of an instance share a pod (one IP), and the pull then never leaves it.
    `need`: the request's reserved KV tokens. None: every instance is saturated or not routable."""
    open_ = [i for i in instances if i.routable and not decode_saturated(i, need)]
    with_slot = [i for i in open_ if i.load < decode_slots(i)]  # it runs at once there
    pool = with_slot or open_
    if near:
        beside = [i for i in pool if host(i.address) == host(near)]
        pool = beside or pool
    return min(pool, key=lambda i: (i.load, i.address)) if pool else None
