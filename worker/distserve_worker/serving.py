"""The gRPC lifecycle every worker role shares (prefill, decode, colocated).

Bind and start the server, start the role's loops, report ready; when the worker stops (cancelled,
Ctrl-C, SIGTERM, or a loop failing), cancel the loops and stop the server with a short grace so
in-flight RPCs end with an error instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, MutableMapping, Sequence
from typing import Any

import grpc


async def serve_until_stopped(
    server: grpc.aio.Server,
    address: str,
    loops: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    *,
    state: MutableMapping[str, bool],
    label: str,
) -> None:
    """Serve `address` and run `loops` until one ends or this is cancelled; `state["ready"]` turns
    True once both are up (what /readyz reports)."""
    server.add_insecure_port(address)
    await server.start()
    tasks = [asyncio.create_task(loop()) for loop in loops]
    try:
        state["ready"] = True
        print(f"[distserve] {label} serving gRPC on {address}", flush=True)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await server.stop(grace=1.0)
