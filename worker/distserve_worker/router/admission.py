"""The router's admission queue for one role: a bounded line of requests waiting for an instance.

A request that finds every instance of a role saturated (or none ready: a Status poll that timed
out under load, an instance restarting) waits here instead of failing. The line is FIFO: only its
head may take an instance, so a later request never overtakes an earlier one, and the one behind
is asked next as soon as the head leaves (there may be room for it too). Which instance, if any,
is the caller's pure decision (`grant`, see picker.py); the line asks again whenever `notify` says
capacity may have changed (a request left an instance, a poll came back).

Leaving the line: granted; timed out (`QueueTimeout`: no instance of the role had room within
the timeout); or cancelled (the client went away). Whoever leaves wakes the new head. The bound is
checked when a request arrives (`admits`), not here: a request once admitted keeps its place.
No I/O; asyncio waits only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueTimeout(Exception):
    """No instance of the role could take the request within the queue timeout."""


class Admission(Generic[T]):
    def __init__(
        self,
        role: str,
        bound: int,
        timeout_seconds: float,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.role = role
        self.bound = bound
        self.timeout_seconds = timeout_seconds
        self.on_depth = on_depth  # called with the new depth whenever it changes (a metric)
        self._line: deque[asyncio.Event] = deque()

    @property
    def depth(self) -> int:
        return len(self._line)

    def admits(self, ahead: int = 0, room: int = 0) -> bool:
        """Whether a request arriving now stays within the bound: the requests waiting here, plus
        `ahead` that will reach this line before it, less the `room` instances have free right now
        (those are taken without waiting), are fewer than the bound."""
        return self.depth + ahead - room < self.bound

    def notify(self) -> None:
        """Capacity may have changed: the head asks `grant` again."""
        if self._line:
            self._line[0].set()

    async def take(self, grant: Callable[[], T | None]) -> T:
        """An instance from `grant`, at once when nobody waits and it has one; otherwise in turn.
        Raises QueueTimeout after `timeout_seconds` of waiting."""
        if not self._line:
            got = grant()
            if got is not None:
                return got
        turn = asyncio.Event()
        self._line.append(turn)
        self._changed()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                while True:
                    if self._line[0] is turn:
                        got = grant()
                        if got is not None:
                            return got
                    turn.clear()
                    await turn.wait()
        except TimeoutError:
            raise QueueTimeout(
                f"no {self.role} instance could take this request within {self.timeout_seconds:g} s "
                "(every one saturated or not ready)"
            ) from None
        finally:
            self._line.remove(turn)
            self._changed()
            self.notify()  # the new head may fit where this one did (or would have)

    def _changed(self) -> None:
        if self.on_depth is not None:
            self.on_depth(len(self._line))
