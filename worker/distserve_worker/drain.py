"""Graceful drain: what a worker process does between SIGTERM and its exit.

An instance going away (scale-down, re-plan, rollout, node drain) receives SIGTERM:

1. At once it stops taking new work: /readyz answers 503, its Status says `draining` (ready false),
   and new Prefill/Decode calls are refused with UNAVAILABLE and the trailer
   `distserve-refused: draining`, which tells a router that the instance did nothing with the
   request, so it retries it on another instance and stops picking this one.
2. It finishes what it holds (`Drainable.idle` says when it holds nothing): a prefill instance the
   prompts it accepted and the KV pulls of what it answered; a decode instance its sequences.
3. It exits when idle, or when its budget runs out (`--drain-seconds` after the signal): then it
   gives up what is left (`Drainable.give_up`: KV caches released, requests still in flight failed
   with the reason; none hangs) and exits.

A second SIGTERM, or SIGINT, stops the process at once. A signal that arrives before the process
serves (still loading) stops it at once too: it holds nothing yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import grpc

# The trailer a draining instance refuses a call with; routers retry the call elsewhere.
REFUSED_KEY = "distserve-refused"
DRAINING = "draining"
# How often idleness is re-checked when nothing pokes the drain (a KV release by a remote puller
# changes it without passing through the worker's own request code).
RECHECK_SECONDS = 0.1


class DrainExpired(RuntimeError):
    """The drain budget ran out with this request still held here."""


class Drainable(Protocol):
    def idle(self) -> bool:
        """Holds nothing any more: every accepted request answered and every KV cache released."""
        ...

    async def give_up(self, reason: str) -> int:
        """The budget ran out: release what is held, fail what is in flight with `reason`; returns
        how many requests (or caches) were given up."""
        ...


class Drain:
    """The drain of one process: SERVING -> (SIGTERM) DRAINING -> DONE (drained, or given up at
    the deadline). `start` is the signal's side; `run` the serving side."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds  # the budget (--drain-seconds); 0: no drain, SIGTERM stops at once
        self.clock = clock
        self.serving = False  # armed once the process serves; before that there is nothing to drain
        self.started_at: float | None = None
        self.outcome = ""  # "drained", or what was given up when the budget ran out
        self.on_start: list[Callable[[], None]] = []  # told when the drain begins (metrics, logs)
        self._started = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def start(self) -> bool:
        """SIGTERM: True when a drain begins now; False when the process should stop at once
        (it was already draining, it does not serve yet, or its budget is 0)."""
        if self.draining or not self.serving or self.seconds <= 0:
            return False
        self.started_at = self.clock()
        self._started.set()
        for listener in self.on_start:
            listener()
        return True

    def changed(self) -> None:
        """Something the drain waits for may have happened (a request ended): re-check now."""
        self._changed.set()

    def remaining(self, extra: float = 0.0) -> float:
        """Seconds left of the budget (plus `extra`), counted from the signal."""
        budget = self.seconds + extra
        if self.started_at is None:
            return budget
        return self.started_at + budget - self.clock()

    async def run(self, work: Drainable, extra: float = 0.0) -> str:
        """Serve until SIGTERM, then until `work` is idle or the budget (plus `extra` seconds: a
        later pipeline stage outlives its stage 0's deadline) has passed since the signal; then give
        up what is left. Returns how it ended."""
        self.serving = True
        await self._started.wait()
        while not work.idle():
            remaining = self.remaining(extra)
            if remaining <= 0:
                given_up = await work.give_up(
                    f"the instance is shutting down and its drain budget ({self.seconds:g} s, "
                    "--drain-seconds) ran out before this request finished"
                )
                self.outcome = f"budget ran out: gave up {given_up}"
                return self.outcome
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, RECHECK_SECONDS))
        self.outcome = "drained"
        return self.outcome


async def refuse(
    context: grpc.aio.ServicerContext, who: str, why: str = "it takes no new requests"
) -> NoReturn:
    """Refuse a call this instance did nothing with, while draining: UNAVAILABLE with the trailer
    routers retry on (elsewhere)."""
    await context.abort(
        grpc.StatusCode.UNAVAILABLE,
        f"{who} is draining (shutting down): {why}; send the request to another instance",
        trailing_metadata=((REFUSED_KEY, DRAINING),),
    )
    raise AssertionError("unreachable: abort raises")


def refused_draining(exc: grpc.aio.AioRpcError) -> bool:
    """The call was refused by a draining instance (which did nothing with it): retry elsewhere."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailer: Any = exc.trailing_metadata() or ()
    return any(key == REFUSED_KEY and value == DRAINING for key, value in trailer)
