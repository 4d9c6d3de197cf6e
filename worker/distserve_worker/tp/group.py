"""Rank 0's side of a tensor-parallel instance: start the follower ranks, drive them, watch them.

Rank 0 is the process the pod (or `distserve up`) starts; it spawns ranks 1..tp-1 as child
processes (`python -m distserve_worker.tp.follower`), hosts the store they rendezvous through, and
joins the process group with them. Each step it sends the followers what to run over gRPC
(`distserve.rank.v1`) and runs its own shard of the same forward; the forward's collectives line
the ranks up. A follower that exits, or an RPC to one that fails, breaks the instance: its
in-flight requests fail with the reason at once, it reports not ready, and routers stop picking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import grpc

from distserve_protos.rank.v1 import rank_pb2 as pb
from distserve_protos.rank.v1 import rank_pb2_grpc as pb_grpc
from distserve_worker.kvtransfer.transport import channel_options
from distserve_worker.peers import RankGroupBroken
from distserve_worker.pp.pieces import KVPiece
from distserve_worker.settings import DecodeSettings, PrefillSettings
from distserve_worker.tp.ranks import RankPlace, host_store, join

STEP_TIMEOUT = 120.0  # seconds; a collective that hangs fails sooner (ranks.COLLECTIVE_TIMEOUT)


def follower_config(role: str, settings: PrefillSettings | DecodeSettings, rank: int, store_port: int) -> str:
    data = asdict(settings)
    return json.dumps({"role": role, "rank": rank, "store_port": store_port, "settings": data})


class RankGroup:
    def __init__(self, role: str, settings: PrefillSettings | DecodeSettings) -> None:
        self.role = role
        self.settings = settings
        self.world = settings.tp
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.store: Any = None
        self.addresses: list[str] = []  # rank 0 first
        self.stubs: dict[int, pb_grpc.RankServiceStub] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.described: dict[int, pb.RankDescription] = {}
        self.broken: str | None = None
        self.on_broken: list[Callable[[str], None]] = []
        self.seq = 0  # forwards handed out so far; followers run them in this order

    def next_seq(self) -> int:
        """The order number of the forward rank 0 is about to run. Take it right before submitting
        that forward to rank 0's (single, FIFO) executor, with no await in between: followers run
        forwards in this order, so concurrent forwards (pipeline micro-batches, overlapping prefill
        batches) reach every rank's collectives in the same order."""
        seq = self.seq
        self.seq += 1
        return seq

    # --- start ------------------------------------------------------------------------------------

    def spawn(self) -> RankPlace:
        """Host the store and start the followers; returns rank 0's place (join it next)."""
        self.store = host_store(self.world)
        for rank in range(1, self.world):
            config = follower_config(self.role, self.settings, rank, self.store.port)
            self.procs[rank] = subprocess.Popen(
                [sys.executable, "-m", "distserve_worker.tp.follower", config],
                # The follower lives until this pipe closes (close(), or this process gone): not
                # until SIGTERM, which reaches it too while this rank drains (tp/follower.py).
                stdin=subprocess.PIPE,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )
        return RankPlace(0, self.world, self.store.port)

    def join(self, place: RankPlace) -> None:
        join(place, self.store)

    def _wait_address(self, rank: int, deadline: float) -> str:
        key = f"rank/{rank}"
        while True:
            self._check_started(rank)
            try:
                self.store.wait([key], datetime.timedelta(seconds=1))
                return bytes(self.store.get(key)).decode()
            except RuntimeError:  # store timeout: not published yet
                if time.monotonic() > deadline:
                    raise RankGroupBroken(
                        f"rank {rank} did not come up within the start-up timeout"
                    ) from None

    def _check_started(self, rank: int) -> None:
        code = self.procs[rank].poll()
        if code is not None:
            raise RankGroupBroken(f"tensor-parallel rank {rank} exited with status {code} while starting")

    async def connect(self, own_address: str, timeout: float = 600.0) -> None:
        """Wait until every follower serves, then learn what each holds."""
        deadline = time.monotonic() + timeout
        self.addresses = [own_address]
        for rank in range(1, self.world):
            address = await asyncio.to_thread(self._wait_address, rank, deadline)
            self.addresses.append(address)
            channel = grpc.aio.insecure_channel(
                address, options=channel_options(self.settings.max_chunk_bytes)
            )
            self.channels.append(channel)
            self.stubs[rank] = pb_grpc.RankServiceStub(channel)
        for rank, stub in self.stubs.items():
            self.described[rank] = await stub.Describe(pb.DescribeRequest(), timeout=30)

    # --- health -----------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            print(f"[distserve] instance broken: {reason}", flush=True)
            for listener in self.on_broken:
                listener(reason)

    def check(self) -> None:
        if self.broken is not None:
            raise RankGroupBroken(self.broken)

    def dead_rank(self) -> str | None:
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return f"tensor-parallel rank {rank} of {self.settings.address} {how}"
        return None

    async def watch_loop(self) -> None:
        """A follower that exits breaks the instance within a fraction of a second."""
        while self.broken is None:
            reason = self.dead_rank()
            if reason:
                self.fail(reason)
            await asyncio.sleep(0.2)

    async def fail_forward(self, what: str, exc: BaseException) -> str:
        """A forward failed on rank 0: the ranks are out of step. The reason users see names the
        dead rank when there is one (a collective fails as soon as a peer's sockets close, a moment
        before the process is seen gone), not the collective library's long message."""
        for _ in range(10):
            reason = self.dead_rank()
            if reason:
                break
            await asyncio.sleep(0.1)
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = f"{what} failed: {first[:300]}"
        self.fail(reason)
        return self.broken or reason

    async def _call(self, rank: int, method: str, request: Any, timeout: float) -> Any:
        try:
            return await getattr(self.stubs[rank], method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            # A pull the rank could not complete fails its request (ABORTED); anything else means
            # the rank is gone or out of step with the others.
            if not (method == "Pull" and exc.code() == grpc.StatusCode.ABORTED):
                self.fail(f"tensor-parallel rank {rank}: {method} failed: {exc.code().name}: {exc.details()}")
            raise RankGroupBroken(f"rank {rank}: {method}: {exc.code().name}: {exc.details()}") from exc

    # --- what rank 0 tells the followers ----------------------------------------------------------

    async def prefill(
        self, batch: list[tuple[str, list[int]]], seq: int, hidden_shape: list[int] | None = None
    ) -> None:
        """Followers run their shards of this prefill forward (`seq` from `next_seq`); a pipeline
        stage after the first broadcasts its input hidden states of `hidden_shape` in the forward."""
        self.check()
        request = pb.PrefillBatch(
            prompts=[pb.Prompt(request_id=r, token_ids=p) for r, p in batch],
            seq=seq,
            hidden_shape=hidden_shape or [],
        )
        await asyncio.gather(*(self._call(r, "Prefill", request, STEP_TIMEOUT) for r in self.stubs))

    async def step(
        self,
        ops: list[pb.BatchOp],
        last_tokens: list[int],
        new_batch: bool,
        seq: int,
        lane: int = 0,
        hidden_shape: list[int] | None = None,
    ) -> None:
        self.check()
        request = pb.DecodeStep(
            ops=ops,
            last_tokens=last_tokens,
            new_batch=new_batch,
            seq=seq,
            lane=lane,
            hidden_shape=hidden_shape or [],
        )
        await asyncio.gather(*(self._call(r, "Step", request, STEP_TIMEOUT) for r in self.stubs))

    async def pull(
        self,
        rank: int,
        request_id: str,
        num_tokens: int,
        pieces: list[KVPiece],
        timeout: float,
    ) -> pb.Pulled:
        self.check()
        request = pb.PullKV(
            request_id=request_id,
            num_tokens=num_tokens,
            sources=[
                pb.KVSource(
                    address=p.address,
                    head_start=p.heads[0],
                    head_end=p.heads[1],
                    layer_start=p.layers[0],
                    layer_end=p.layers[1],
                )
                for p in pieces
            ],
        )
        result: pb.Pulled = await self._call(rank, "Pull", request, timeout)
        return result

    # --- stop -------------------------------------------------------------------------------------

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for proc in self.procs.values():
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # the follower's cue to exit
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self.procs.items()}
