"""Which prefill and which decode instance a request goes to. Pure: no I/O, no clock.

Only *routable* instances are picked: those that answered the last Status poll (`healthy`) and
reported themselves ready (`ready`; false while loading or while one of a tensor-parallel
instance's ranks is dead, so a dead rank takes its whole instance out of rotation and the others
keep serving). An older worker that reports no topology (`tp == 0`) counts as ready once it answers.

Load is what this router has in flight on an instance or what the instance last reported
(queued + running), whichever is larger: the first is exact for this router, the second also
counts other routers' requests. Prefill: the least-loaded routable instance. Decode: among routable
instances with a free slot, the least loaded, one in the prefill's own pod first (SharedPod); when
none has room, the least loaded anyway (it queues the request and pulls its KV cache later, so the
prefill buffer stays the queue).
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
    error: str = ""
    # Topology (WorkerStatus); tp == 0: not reported (an older worker, or never polled yet).
    tp: int = 0
    pp: int = 0
    stage: int = 0
    layers: tuple[int, int] | None = None  # [start, end)
    ranks: list[Rank] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)  # pipeline stages (pp > 1), stage 0 first

    @property
    def load(self) -> int:
        return max(self.inflight, self.queued + self.running)

    @property
    def routable(self) -> bool:
        return self.healthy and self.ready


def pick_prefill(instances: list[Instance]) -> Instance | None:
    routable = [i for i in instances if i.routable]
    return min(routable, key=lambda i: (i.load, i.address)) if routable else None


def host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def pick_decode(instances: list[Instance], near: str = "") -> Instance | None:
    """`near`: the address the request's KV cache is pulled from (its prefill instance). A decode
    instance with room on that same host comes first: with `stageLayout: SharedPod` prefill and
    decode stage s of an instance share a pod (one IP), and the pull then never leaves it."""
    routable = [i for i in instances if i.routable]
    with_room = [i for i in routable if i.free_slots - i.inflight > 0 or i.load < i.free_slots]
    if near:
        beside = [i for i in with_room if host(i.address) == host(near)]
        with_room = beside or with_room
    pool = with_room or routable
    return min(pool, key=lambda i: (i.load, i.address)) if pool else None
