"""A pipeline stage after the first: `distserve worker prefill|decode --stage S` with S > 0.

It holds layers [l_S, l_{S+1}) of the model (its tensor-parallel ranks, if any, beside it) and serves
`distserve.stage.v1` to the stage before it:

- `Forward` (prefill): run the batch through its layers; keep each prompt's KV of those layers
  (encoded once into the pieces decode stages will pull, `pp/pieces.py`) and serve them
  (`distserve.kvtransfer.v1`, same port); hand the hidden states on to the next stage, or, on the
  last stage, sample each prompt's first token.
- `Pull` (decode): pull this stage's layers of a request's cache from the prefill stages holding
  them (each rank its heads) and hold it until the request joins a micro-batch.
- `Forward` (decode): apply stage 0's changes to one micro-batch (a lane: its own batch), run the
  step through its layers, hand on or (last stage) sample the new tokens.
- `Describe`: its layers, ranks and readiness; stage 0 polls it to know the chain is whole.
- `Leave`: stage 0 is closing; no more work comes from it.

A failure here fails the forward with the stage named (UNAVAILABLE); stage 0 then breaks the chain.

Draining (SIGTERM, drain.py): a later stage takes no requests of its own (stage 0 refuses them), so
it keeps serving its stage 0 until that one has drained and left (`Leave`), or has stopped polling
(gone without a word), or its own budget plus `LATER_STAGE_EXTRA` has passed: its stage 0, signalled
at about the same time, gives up first and fails its requests with the clearer reason. It keeps
answering `Describe` as ready meanwhile: not ready would break its stage 0's chain and fail the very
requests the drain is finishing.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from distserve_protos.rank.v1 import rank_pb2 as rank_pb
from distserve_protos.stage.v1 import stage_pb2 as pb
from distserve_protos.stage.v1 import stage_pb2_grpc as pb_grpc
from distserve_worker.drain import Drain
from distserve_worker.engine.kvcache import BatchedKV, SequenceKV
from distserve_worker.engine.runner import KVLayout, ModelRunner, PrefillOutput
from distserve_worker.engine.sampling import SamplingParams, sample, sampling_from_proto
from distserve_worker.kvtransfer.buffer import KVBuffer
from distserve_worker.kvtransfer.prepared import prepare
from distserve_worker.kvtransfer.reshard import pull_kv_pieces
from distserve_worker.kvtransfer.transport import GrpcKVPuller
from distserve_worker.peers import KVPullError
from distserve_worker.pp.chain import MAX_FORWARD_BYTES, WATCH_SECONDS, NextStage
from distserve_worker.pp.pieces import SourceStage, layer_spans, pieces_to_pull
from distserve_worker.pp.wire import StageWireError, read_forward
from distserve_worker.settings import DecodeSettings, PrefillSettings
from distserve_worker.tp.group import RankGroup
from distserve_worker.tp.heads import prepared_by, rank_heads
from distserve_worker.tp.ranks import broadcast_hidden
from distserve_worker.tp.topology import rank_infos

UNBOUNDED = 1 << 62  # stage 0's buffer bounds the instance (backpressure); later stages mirror it
# Stage 0 polls `Describe` every WATCH_SECONDS: this long without a poll, it is gone.
LEADER_GONE_SECONDS = 6 * WATCH_SECONDS
# A draining later stage outlives its own budget by this much (see the module's doc).
LATER_STAGE_EXTRA = 2.0


@dataclass
class Lane:
    """One micro-batch as this stage holds it: the batch and each row's sampling (last stage)."""

    batch: BatchedKV | None = None
    sampling: list[SamplingParams] = field(default_factory=list)


class StageServer(pb_grpc.StageServiceServicer):
    def __init__(
        self,
        role: str,
        settings: PrefillSettings | DecodeSettings,
        runner: ModelRunner,
        layout: KVLayout,
        kv_heads: int,
        group: RankGroup | None,
        drain: Drain | None = None,
    ) -> None:
        self.role = role
        self.drain = drain or Drain(0)  # none given: never drains
        # The stage 0 driving this stage (its id from `Describe`), when it last asked, and the ids
        # of stage 0 processes that said they left.
        self.leader = ""
        self.leader_seen: float | None = None
        self.left: set[str] = set()
        self.settings = settings
        self.runner = runner
        self.layout = layout
        self.kv_heads = kv_heads
        self.group = group
        self.tp = settings.tp
        self.stage = settings.stage
        self.layers = (runner.span.start, runner.span.end)
        self.own = rank_heads(kv_heads, settings.tp, 0)
        self.boot_id = uuid.uuid4().hex
        self.next = (
            None
            if runner.last
            else NextStage(settings.stage_addresses[self.stage + 1], settings.max_chunk_bytes)
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-forward")
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-encode")
        ttl = getattr(settings, "kv_ttl_seconds", 60.0)
        self.ttl = ttl
        self.buffer = KVBuffer(UNBOUNDED, ttl)  # prefill: this stage's layers of each prompt's cache
        self.puller = GrpcKVPuller(settings.max_chunk_bytes)
        self.pulled: dict[str, tuple[SequenceKV, float]] = {}  # decode: pulled, not yet in a lane
        self.lanes: dict[int, Lane] = {}
        self.ready = False
        if isinstance(settings, PrefillSettings):
            self.pieces = prepared_by(kv_heads, settings.tp, settings.decode_tp, 0)
            self.spans = layer_spans(self.layers, settings.decode_layers, runner.span.total)

    # --- forward ------------------------------------------------------------------------------------

    async def Forward(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.ForwardResult:
        try:
            header, hidden = await read_forward(request_iterator, MAX_FORWARD_BYTES)
        except StageWireError as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, f"stage {self.stage}: {exc}")
        if self.group is not None and self.group.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"stage {self.stage}: {self.group.broken}")
        try:
            if header.WhichOneof("work") == "prefill":
                tokens = await self._prefill(header.prefill, hidden)
            else:
                tokens = await self._decode(header.decode, hidden)
        except grpc.aio.AioRpcError as exc:  # from the next stage: pass its words on
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.details() or exc.code().name)
        except LookupError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"stage {self.stage}: {exc}")
        except Exception as exc:  # a failed forward: the stage (and its ranks) may be out of step
            reason = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            if self.group is not None:
                reason = await self.group.fail_forward(f"stage {self.stage} forward", exc)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"pipeline stage {self.stage} at {self.settings.address} failed: {reason}",
            )
        return pb.ForwardResult(token_ids=tokens)

    def _run(self, job: Any, hidden: torch.Tensor) -> Any:
        """In the forward thread: hand the input to this stage's other ranks, then run."""
        if self.group is not None:
            hidden = broadcast_hidden(hidden.to(self.runner.device))
        return job(hidden)

    async def _submit(self, job: Any, hidden: torch.Tensor, followers: Any) -> Any:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.executor, self._run, job, hidden)
        if followers is not None:
            await followers
        return out

    async def _prefill(self, work: pb.PrefillWork, hidden: torch.Tensor) -> list[int]:
        prompts = [list(p.token_ids) for p in work.prompts]
        followers = None
        if self.group is not None:
            seq = self.group.next_seq()
            batch = [(p.request_id, list(p.token_ids)) for p in work.prompts]
            followers = asyncio.ensure_future(self.group.prefill(batch, seq, list(hidden.shape)))
        job = functools.partial(self._prefill_forward, prompts)
        outs, out_hidden = await self._submit(job, hidden, followers)
        store = asyncio.ensure_future(self._store(work.prompts, outs))
        try:
            if self.next is None:
                return [
                    sample(o.last_logits, sampling_from_proto(p.sampling), index=0)
                    for p, o in zip(work.prompts, outs, strict=True)
                ]
            return await self.next.forward(pb.ForwardHeader(prefill=work), out_hidden)
        finally:
            await store

    def _prefill_forward(
        self, prompts: list[list[int]], hidden: torch.Tensor
    ) -> tuple[list[PrefillOutput], Any]:
        return self.runner.prefill_stage(prompts, hidden)

    async def _store(self, prompts: Any, outs: list[PrefillOutput]) -> None:
        assert isinstance(self.settings, PrefillSettings)
        loop = asyncio.get_running_loop()
        for prompt, out in zip(prompts, outs, strict=True):
            encoded = await loop.run_in_executor(
                self.encoder,
                prepare,
                prompt.request_id,
                out.kv,
                self.pieces,
                self.own,
                self.settings.max_chunk_bytes,
                self.layers,
                self.spans,
            )
            if prompt.request_id in self.buffer.entries:  # a retried id whose release missed us
                await self.buffer.release(prompt.request_id)
            await self.buffer.reserve(prompt.request_id, encoded.nbytes)
            self.buffer.store(prompt.request_id, encoded, encoded.nbytes)

    async def _decode(self, work: pb.DecodeWork, hidden: torch.Tensor) -> list[int]:
        assert isinstance(self.settings, DecodeSettings)
        lane = Lane() if work.new_batch else self.lanes.setdefault(work.lane, Lane())
        self.lanes[work.lane] = lane
        rank_ops = []
        for op in work.ops:
            if op.WhichOneof("op") == "remove_row":
                assert lane.batch is not None
                lane.batch.remove(op.remove_row)
                last = lane.sampling.pop()
                if op.remove_row < len(lane.sampling):
                    lane.sampling[op.remove_row] = last
                rank_ops.append(rank_pb.BatchOp(remove_row=op.remove_row))
            else:
                entry = self.pulled.pop(op.add.request_id, None)
                if entry is None:
                    raise LookupError(f"no KV cache pulled here for request {op.add.request_id!r}")
                if lane.batch is None:
                    lane.batch = self.runner.empty_batch(entry[0], self.settings.max_batch)
                lane.batch.add(entry[0])
                lane.sampling.append(sampling_from_proto(op.add.sampling))
                rank_ops.append(rank_pb.BatchOp(add_request=op.add.request_id))
        if lane.batch is None:
            raise LookupError(f"lane {work.lane} has no batch (stage 0 sent a step before any row)")
        followers = None
        if self.group is not None:
            seq = self.group.next_seq()
            followers = asyncio.ensure_future(
                self.group.step(rank_ops, [], work.new_batch, seq, work.lane, list(hidden.shape))
            )
        batch = lane.batch
        out = await self._submit(functools.partial(self.runner.decode_step, batch, []), hidden, followers)
        if self.next is not None:
            return await self.next.forward(pb.ForwardHeader(decode=work), out)
        return [
            sample(out[row], lane.sampling[row], index=work.sample_index[row])
            for row in range(len(lane.sampling))
        ]

    # --- decode KV ----------------------------------------------------------------------------------

    async def Pull(self, request: pb.StagePull, context: grpc.aio.ServicerContext) -> rank_pb.Pulled:
        started = time.perf_counter()
        sources = [SourceStage((s.layer_start, s.layer_end), tuple(s.ranks)) for s in request.sources]
        timeout = getattr(self.settings, "pull_timeout_seconds", 30.0)
        try:
            plans = [pieces_to_pull(sources, self.layers, self.kv_heads, self.tp, r) for r in range(self.tp)]
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stage {self.stage}: {exc}")
        own = pull_kv_pieces(
            self.puller,
            request.request_id,
            request.num_tokens,
            plans[0],
            self.layout,
            self.settings.max_chunk_bytes,
            timeout,
        )
        followers = [
            self.group.pull(r, request.request_id, request.num_tokens, plans[r], timeout)
            for r in range(1, self.tp)
            if self.group is not None
        ]
        try:
            kv, *pulled = await asyncio.gather(own, *followers)
        except KVPullError as exc:
            await context.abort(grpc.StatusCode.ABORTED, f"stage {self.stage}: {exc}")
        self.pulled[request.request_id] = (kv, time.monotonic())
        return rank_pb.Pulled(
            bytes=kv.nbytes + sum(p.bytes for p in pulled), seconds=time.perf_counter() - started
        )

    # --- health -------------------------------------------------------------------------------------

    def describe(self) -> pb.StageDescription:
        broken = self.group.broken if self.group is not None else None
        capacity = getattr(self.settings, "max_kv_tokens", 0) or (
            getattr(self.settings, "kv_buffer_bytes", 0) // max(1, self.layout.bytes_per_token)
        )
        return pb.StageDescription(
            stage=self.stage,
            layer_start=self.layers[0],
            layer_end=self.layers[1],
            tp=self.tp,
            address=self.settings.address,
            ready=self.ready and broken is None,
            broken=broken or "",
            ranks=rank_infos(self.runner, self.group, self.kv_heads, capacity, self.settings.address),
            boot_id=self.boot_id,
        )

    async def Describe(
        self, request: pb.DescribeStageRequest, context: grpc.aio.ServicerContext
    ) -> pb.StageDescription:
        self.leader, self.leader_seen = request.leader_id, time.monotonic()
        return self.describe()

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        self.left.add(request.leader_id)
        self.drain.changed()
        return pb.LeaveResponse()

    # --- drain --------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """Nothing more will come: its stage 0 left, or stopped polling (or never did)."""
        if self.leader_seen is None or time.monotonic() - self.leader_seen > LEADER_GONE_SECONDS:
            return True
        return self.leader in self.left

    async def give_up(self, reason: str) -> int:
        """Its budget ran out with stage 0 still there: release the caches it holds."""
        held = list(self.buffer.entries) + list(self.pulled)
        for rid in list(self.buffer.entries):
            await self.buffer.release(rid)
        self.pulled.clear()
        return len(held)

    async def close(self) -> None:
        if self.next is not None:
            await self.next.close()
        await self.puller.close()

    async def reap_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ttl / 4))
            await self.buffer.expire()
            now = time.monotonic()
            for rid in [r for r, (_, at) in self.pulled.items() if now - at > self.ttl]:
                self.pulled.pop(rid, None)  # pulled for a request that never joined (aborted)


async def serve_stage(
    role: str, settings: PrefillSettings | DecodeSettings, drain: Drain | None = None
) -> None:
    """Load this stage's layers (its ranks' shards of them), serve the stage and KV gRPC and HTTP
    until cancelled or, after `drain` started (SIGTERM), its stage 0 left."""
    from distserve_worker.engine.runner import probe_kv_layout
    from distserve_worker.kvtransfer.transport import KVTransferServicer, channel_options
    from distserve_worker.kvtransfer.transport import add_to_server as add_kv_transfer
    from distserve_worker.serving import WorkerProcess, new_server, serve_until_stopped
    from distserve_worker.tp.launch import start_ranks

    server = new_server(channel_options(settings.max_chunk_bytes))
    stage: StageServer | None = None
    # Stage 0 drives this stage; it has no chain of its own.
    async with WorkerProcess(role, settings, chain=False, drain=drain) as process:
        try:
            process.group, model, _, kv_heads = await start_ranks(role, settings)
            runner = ModelRunner(model, settings.threads or None)
            layout = await asyncio.to_thread(probe_kv_layout, runner)
            stage = StageServer(role, settings, runner, layout, kv_heads, process.group, process.drain)
            pb_grpc.add_StageServiceServicer_to_server(stage, server)
            if role == "prefill":
                add_kv_transfer(
                    KVTransferServicer(
                        stage.buffer, settings.max_chunk_bytes, heads=stage.own, layers=stage.layers
                    ),
                    server,
                )
            loops = [stage.reap_loop, *await process.loops()]
            stage.ready = True
            where = f"layers [{stage.layers[0]}, {stage.layers[1]})"
            tp = f", TP{settings.tp}" if settings.tp > 1 else ""
            await serve_until_stopped(
                server,
                f"{settings.host}:{settings.port}",
                loops,
                state=process.state,
                label=f"{role} stage {settings.stage}/{settings.pp} ({where}{tp})",
                drain=process.drain,
                work=stage,
                drain_extra=LATER_STAGE_EXTRA,
            )
        finally:
            if stage is not None:
                await stage.close()
