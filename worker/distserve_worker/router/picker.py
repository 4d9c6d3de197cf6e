"""Which prefill and which decode instance a request goes to. Pure: no I/O, no clock.

Load is what this router has in flight on an instance or what the instance last reported
(queued + running), whichever is larger: the first is exact for this router, the second also
counts other routers' requests. Prefill: the least-loaded healthy instance. Decode: among healthy
instances with a free slot, the least loaded; when none has room, the least loaded anyway (it
queues the request and pulls its KV cache later, so the prefill buffer stays the queue).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Instance:
    address: str
    healthy: bool = False
    queued: int = 0
    running: int = 0
    free_slots: int = 0
    max_context: int = 0
    inflight: int = 0  # this router's requests on it right now
    error: str = ""

    @property
    def load(self) -> int:
        return max(self.inflight, self.queued + self.running)


def pick_prefill(instances: list[Instance]) -> Instance | None:
    healthy = [i for i in instances if i.healthy]
    return min(healthy, key=lambda i: (i.load, i.address)) if healthy else None


def pick_decode(instances: list[Instance]) -> Instance | None:
    healthy = [i for i in instances if i.healthy]
    with_room = [i for i in healthy if i.free_slots - i.inflight > 0 or i.load < i.free_slots]
    pool = with_room or healthy
    return min(pool, key=lambda i: (i.load, i.address)) if pool else None
