"""The prefill instance's bounded KV buffer: where finished prefills wait to be pulled.

Lifecycle of an entry: `reserve` (waits while the buffer is full: this is the backpressure that
stops prefill from admitting; nothing is dropped) -> `store` once the prefill forward is done ->
`get` by the pull stream(s) -> `release` when the decode instance holds a verified copy, or
`expire` once its deadline passes (a decode instance that died, a router that never called decode).
A reservation whose prefill fails or whose caller leaves is `cancel`led.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class BufferTooSmall(ValueError):
    """The request alone needs more than the whole buffer; waiting would never help."""


@dataclass
class Entry:
    nbytes: int
    value: Any = None  # the SequenceKV once stored
    expires_at: float = float("inf")


class KVBuffer:
    def __init__(
        self, capacity_bytes: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity_bytes
        self.ttl = ttl_seconds
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        self.changed = asyncio.Condition()
        self.waiting = 0

    @property
    def used(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    async def reserve(self, request_id: str, nbytes: int) -> None:
        if nbytes > self.capacity:
            raise BufferTooSmall(f"request needs {nbytes} bytes of KV buffer, capacity is {self.capacity}")
        if request_id in self.entries:
            raise KeyError(f"request {request_id!r} already holds a KV buffer entry")
        async with self.changed:
            self.waiting += 1
            try:
                await self.changed.wait_for(lambda: self.used + nbytes <= self.capacity)
            finally:
                self.waiting -= 1
            self.entries[request_id] = Entry(nbytes)

    def store(self, request_id: str, value: Any, nbytes: int) -> None:
        entry = self.entries[request_id]
        entry.value, entry.nbytes = value, nbytes
        entry.expires_at = self.clock() + self.ttl

    def get(self, request_id: str) -> Any:
        entry = self.entries.get(request_id)
        return None if entry is None else entry.value

    async def release(self, request_id: str) -> bool:
        async with self.changed:
            entry = self.entries.pop(request_id, None)
            self.changed.notify_all()
        return entry is not None

    async def cancel(self, request_id: str) -> None:
        await self.release(request_id)

    async def expire(self) -> list[str]:
        now = self.clock()
        dead = [rid for rid, e in self.entries.items() if e.expires_at <= now]
        for rid in dead:
            await self.release(rid)
        return dead
