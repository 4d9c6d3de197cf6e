"""Stage 0's view of its instance's pipeline: the later stages, the link to the next one, health.

Stage 0 is the process the router calls. It runs its own layers, then streams the hidden states to
stage 1 (`NextStage.forward`); each stage does the same to the next, and the last stage's sampled
token ids come back as the calls return. Stage 0 also asks every later stage to pull its own layers
of a request's KV cache (`StageChain.pull`).

The instance is ready only while its whole chain is connected. `watch_loop` asks every stage to
describe itself twice a second: a stage that does not answer, reports itself not ready, or
answers with a new boot id (it restarted, so its per-request state is gone) breaks the chain. A
broken chain fails every request on the instance at once, with the stage and the reason, and
reports not ready, so routers send new requests elsewhere. When every stage answers again (the
kubelet restarted the dead one, or `distserve up`'s test did), the chain is whole again and the
instance ready, without any other stage restarting.

Each poll names this stage 0 process (`leader_id`, new at every start); closing, it tells every
later stage it left (`Leave`), so a later stage that is draining exits right after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import grpc
import torch

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.rank.v1 import rank_pb2 as rank_pb
from distserve_protos.stage.v1 import stage_pb2 as pb
from distserve_protos.stage.v1 import stage_pb2_grpc as pb_grpc
from distserve_worker.peers import KVPullError, StageChainBroken
from distserve_worker.pp.wire import forward_messages

WATCH_SECONDS = 0.5
DESCRIBE_TIMEOUT = 2.0
LEAVE_TIMEOUT = 1.0
FORWARD_TIMEOUT = 120.0
# Hidden states between stages: a prefill batch's are up to budget x hidden x dtype bytes.
MAX_FORWARD_BYTES = 1 << 31


def stage_channel(address: str, max_chunk_bytes: int) -> grpc.aio.Channel:
    limit = max_chunk_bytes + 64 * 1024
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # A fresh subchannel for a fresh channel: a restarted stage is reached at once, not after the
        # process-wide subchannel's reconnect backoff.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.insecure_channel(address, options=options)


class NextStage:
    """The link from one stage to the next: a client-streamed forward per batch or micro-batch."""

    def __init__(self, address: str, max_chunk_bytes: int) -> None:
        self.address = address
        self.max_chunk_bytes = max_chunk_bytes
        self.channel = stage_channel(address, max_chunk_bytes)
        self.stub = pb_grpc.StageServiceStub(self.channel)

    async def forward(self, header: pb.ForwardHeader, hidden: torch.Tensor) -> list[int]:
        """Run the rest of the chain on `hidden`; the token ids the last stage sampled."""
        messages = forward_messages(header, hidden.detach().to("cpu"), self.max_chunk_bytes)
        result: pb.ForwardResult = await self.stub.Forward(messages, timeout=FORWARD_TIMEOUT)
        return list(result.token_ids)

    async def reconnect(self) -> None:
        await self.channel.close()
        self.channel = stage_channel(self.address, self.max_chunk_bytes)
        self.stub = pb_grpc.StageServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


class StageChain:
    def __init__(self, role: str, addresses: tuple[str, ...], max_chunk_bytes: int) -> None:
        self.role = role
        self.addresses = addresses  # every stage's, stage 0 (this process) first
        self.max_chunk_bytes = max_chunk_bytes
        self.next = NextStage(addresses[1], max_chunk_bytes)
        self.channels = {s: stage_channel(a, max_chunk_bytes) for s, a in enumerate(addresses) if s > 0}
        self.stubs = {s: pb_grpc.StageServiceStub(c) for s, c in self.channels.items()}
        self.described: dict[int, pb.StageDescription] = {}
        self.broken: str | None = "connecting to its pipeline stages"
        self.connected = False  # every stage has answered at least once
        self.on_broken: list[Callable[[str], None]] = []
        self.leader_id = uuid.uuid4().hex

    @property
    def pp(self) -> int:
        return len(self.addresses)

    # --- health -----------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Break the chain: every request on the instance fails with `reason`, it reports not ready."""
        if self.broken is None:
            self.broken = reason
            print(f"[distserve] {self.role} instance not ready: {reason}", flush=True)
            for listener in self.on_broken:
                listener(reason)

    def check(self) -> None:
        if self.broken is not None:
            raise StageChainBroken(self.broken)

    async def _describe(self, stage: int) -> pb.StageDescription | str:
        """The stage's description, or why it cannot be had (said the way a user reads it)."""
        address = self.addresses[stage]
        try:
            d: pb.StageDescription = await self.stubs[stage].Describe(
                pb.DescribeStageRequest(leader_id=self.leader_id), timeout=DESCRIBE_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            return f"pipeline stage {stage} at {address} is unreachable ({exc.code().name})"
        if not d.ready:
            return f"pipeline stage {stage} at {address} is not ready: {d.broken or 'starting'}"
        return d

    async def poll(self) -> None:
        """One round of health: break the chain, or make it whole again. A stage that answers with
        a new boot id restarted (its per-request state is gone): that breaks the chain too, for this
        round; its new boot id is kept, so it is whole again on the next."""
        answers = await asyncio.gather(*(self._describe(s) for s in self.stubs))
        problems = [a for a in answers if isinstance(a, str)]
        for stage, answer in zip(self.stubs, answers, strict=True):
            if isinstance(answer, str):
                continue
            previous = self.described.get(stage)
            if previous is not None and previous.boot_id != answer.boot_id:
                problems.append(
                    f"pipeline stage {stage} at {self.addresses[stage]} restarted (its requests' state is gone)"
                )
            self.described[stage] = answer
        if problems:
            if self.connected:
                self.fail(problems[0])
            else:
                self.broken = f"waiting for its pipeline stages: {problems[0]}"
            return
        if self.broken is not None:
            if self.connected:
                print(f"[distserve] {self.role} instance whole again: all {self.pp} stages serve", flush=True)
                await self.next.reconnect()
            self.broken = None
            self.connected = True

    async def watch_loop(self) -> None:
        """Poll from the start: the instance is ready once every later stage answers ready (they
        load their layers while stage 0 loads its own), and not ready while one does not."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            await self.poll()

    # --- work -------------------------------------------------------------------------------------

    def _failed(self, what: str, exc: grpc.aio.AioRpcError) -> StageChainBroken:
        reason = f"pipeline {what} failed: {exc.details() or exc.code().name}"
        self.fail(reason)
        return StageChainBroken(self.broken or reason)

    async def forward(self, header: pb.ForwardHeader, hidden: torch.Tensor) -> list[int]:
        self.check()
        try:
            return await self.next.forward(header, hidden)
        except grpc.aio.AioRpcError as exc:
            raise self._failed(f"forward to stage 1 at {self.next.address}", exc) from exc

    async def pull(
        self, stage: int, request_id: str, num_tokens: int, sources: list[gen.KVStage], timeout: float
    ) -> rank_pb.Pulled:
        """Stage `stage` pulls its layers of a request's cache (each of its ranks its heads)."""
        self.check()
        request = pb.StagePull(request_id=request_id, num_tokens=num_tokens, sources=sources)
        try:
            result: rank_pb.Pulled = await self.stubs[stage].Pull(request, timeout=timeout + 5)
            return result
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:  # that request's pull failed; the stage is fine
                raise KVPullError(f"pipeline stage {stage}: {exc.details()}") from exc
            raise self._failed(f"pull at stage {stage} ({self.addresses[stage]})", exc) from exc

    # --- what it reports --------------------------------------------------------------------------

    def stage_infos(self, own: gen.StageInfo) -> list[gen.StageInfo]:
        out = [own]
        for stage in range(1, self.pp):
            d = self.described.get(stage)
            if d is None:
                out.append(gen.StageInfo(stage=stage, address=self.addresses[stage], ready=False))
                continue
            out.append(
                gen.StageInfo(
                    stage=stage,
                    layer_start=d.layer_start,
                    layer_end=d.layer_end,
                    address=d.address or self.addresses[stage],
                    ready=self.broken is None and d.ready,
                    ranks=list(d.ranks),
                )
            )
        return out

    def kv_stages(self, own: gen.KVStage) -> list[gen.KVStage]:
        """Where each stage's layers of a prefill's cache are (PrefillResponse.kv_stages)."""
        out = [own]
        for stage in range(1, self.pp):
            d = self.described[stage]
            ranks = [r.address for r in sorted(d.ranks, key=lambda r: r.rank)] or [d.address]
            out.append(gen.KVStage(layer_start=d.layer_start, layer_end=d.layer_end, ranks=ranks))
        return out

    async def _leave(self, stage: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):  # a stage that is gone needs no word
            await self.stubs[stage].Leave(pb.LeaveRequest(leader_id=self.leader_id), timeout=LEAVE_TIMEOUT)

    async def close(self) -> None:
        await asyncio.gather(*(self._leave(s) for s in self.stubs))
        await self.next.close()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.close()
