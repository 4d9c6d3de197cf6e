"""The gRPC lifecycle every worker role shares (prefill, decode, colocated).

Bind and start the server, start the role's loops, report ready; when the worker stops (cancelled:
Ctrl-C, a second SIGTERM; a loop failing; or its drain done, see drain.py), cancel the loops and
stop the server with a short grace so in-flight RPCs end with an error instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, MutableMapping, Sequence
from typing import Any

import grpc

from distserve_worker.drain import Drain, Drainable
from distserve_worker.health import start_http
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.pp.chain import StageChain
from distserve_worker.settings import WorkerSettings
from distserve_worker.tp.group import RankGroup
from distserve_worker.tp.topology import broken_reason


def new_server(options: Sequence[tuple[str, int]] = ()) -> grpc.aio.Server:
    """A worker's gRPC server. gRPC binds with SO_REUSEPORT by default, so a second server on a
    port already taken would start too and the kernel would split connections between the two (a
    tensor-parallel rank that took a free port a router was told to call): off, so that it fails."""
    return grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])


def bind(server: grpc.aio.Server, address: str, flag: str = "--port") -> int:
    """Bind `address`; a port in use is a clear error naming the flag, not a traceback."""
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise SystemExit(
            f"[distserve] cannot serve gRPC on {address} ({flag}): {exc}; is the port in use?"
        ) from exc
    if not port:
        raise SystemExit(f"[distserve] cannot serve gRPC on {address} ({flag}): is the port in use?")
    return int(port)


async def serve_until_stopped(
    server: grpc.aio.Server,
    address: str,
    loops: Sequence[Callable[[], Coroutine[Any, Any, None]]],
    *,
    state: MutableMapping[str, bool],
    label: str,
    drain: Drain | None = None,
    work: Drainable | None = None,
    drain_extra: float = 0.0,
) -> None:
    """Serve `address` and run `loops` until one fails, this is cancelled, or (with `drain` and
    `work`) the drain after SIGTERM is done; `state["ready"]` turns True once both are up (what
    /readyz reports, with the drain: until SIGTERM)."""
    bind(server, address)
    await server.start()
    tasks = [asyncio.create_task(loop()) for loop in loops]
    everything = asyncio.gather(*tasks)
    # Cancelled with its loops below, it ends holding a CancelledError: read, not logged as unread.
    everything.add_done_callback(lambda f: f.cancelled() or f.exception())
    drained = asyncio.create_task(drain.run(work, drain_extra)) if drain and work else None
    try:
        state["ready"] = True
        print(f"[distserve] {label} serving gRPC on {address}", flush=True)
        if drained is None:
            await everything
        else:
            # The loops never end by themselves (a watch loop that returns leaves the rest serving).
            either: list[asyncio.Future[Any]] = [everything, drained]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if everything.done():
                everything.result()  # a loop failed: raise it
            elif drain is not None and drain.started_at is not None:
                seconds = drain.clock() - drain.started_at
                print(f"[distserve] {label}: drain done in {seconds:.1f} s ({drained.result()})", flush=True)
    finally:
        if drained is not None:
            drained.cancel()
        everything.cancel()
        for task in tasks:  # those still running after another one failed
            task.cancel()
        with contextlib.suppress(Exception):
            await server.stop(grace=1.0)


class WorkerProcess:
    """What every worker process (prefill, decode, a later pipeline stage) has around its model:
    its metrics; its HTTP side (/readyz: serving, not draining, its ranks alive and its stage chain
    whole; /healthz: fails on a dead rank, so the kubelet restarts the pod with all its ranks); its
    drain (SIGTERM, drain.py); its tensor-parallel rank group (`group`, set once the ranks start)
    and, at stage 0 of a pipelined instance, its chain of later stages. `async with` starts the
    HTTP side and closes it all."""

    def __init__(
        self, role: str, settings: WorkerSettings, *, chain: bool = True, drain: Drain | None = None
    ) -> None:
        self.settings = settings
        self.metrics = RuntimeMetrics(role, settings.model.name, settings.instance or settings.address)
        self.state = {"ready": False}  # serve_until_stopped sets it once gRPC serves
        # Started by SIGTERM (cli_worker); a process run without one (in a test) never drains.
        self.drain = drain or Drain(settings.drain_seconds)
        self.drain.on_start.append(self._draining)
        self.metrics.set_draining(False)
        self.group: RankGroup | None = None
        self.chain = (
            StageChain(role, settings.stage_addresses, settings.max_chunk_bytes)
            if chain and settings.pp > 1
            else None
        )
        self.http: Any = None

    def ready(self) -> bool:
        return (
            self.state["ready"] and not self.drain.draining and broken_reason(self.group, self.chain) is None
        )

    def broken(self) -> str | None:
        """What /healthz fails on: a dead rank (a broken chain is another pod's to restart)."""
        return None if self.group is None else self.group.broken

    def _draining(self) -> None:
        self.metrics.set_draining(True)
        print(
            f"[distserve] SIGTERM: draining (not ready, refusing new requests); exits once what it "
            f"holds is done, or in {self.drain.seconds:g} s (--drain-seconds)",
            flush=True,
        )

    async def loops(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Once the ranks serve: the loops that watch the ranks and the stages."""
        out: list[Callable[[], Coroutine[Any, Any, None]]] = []
        if self.group is not None:
            await self.group.connect(self.settings.address)
            out.append(self.group.watch_loop)
        if self.chain is not None:
            out.append(self.chain.watch_loop)
        return out

    async def __aenter__(self) -> WorkerProcess:
        s = self.settings
        self.http = await start_http(s.host, s.http_port, self.metrics, self.ready, self.broken)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.group is not None:
            await self.group.close()
        if self.chain is not None:
            await self.chain.close()
        await self.http.cleanup()
