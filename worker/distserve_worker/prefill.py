"""The prefill instance: runs prompts, holds their KV caches until a decode instance pulls them.

Lifecycle of a request:
1. `Prefill` RPC: the prompt is checked against the model's context, then its KV cache's size is
   reserved in the bounded buffer. A full buffer makes the call wait there (backpressure: nothing is
   dropped; a caller that gives up leaves no reservation behind).
2. The prompt joins the batch queue; the batch loop takes queued prompts in order up to the token
   budget and runs them in one forward (in the executor thread, so gRPC keeps serving).
3. The first token is sampled, the KV cache is encoded once into its wire form (XXH3-64 checksum per chunk)
   and stored in the buffer with a deadline, and the RPC answers with the token and where to pull
   the cache from.
4. A decode instance pulls the cache (`KVTransferService.Pull`) and then releases it; a cache no one
   released is freed at its deadline.

Draining (SIGTERM, drain.py): new prompts are refused (the router sends them elsewhere); prompts
already accepted are answered and their caches served to the pulls that come; the process exits
once it holds no cache, or at the drain deadline, when it releases what is left.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_protos.stage.v1 import stage_pb2 as stage_pb
from distserve_worker.drain import Drain, DrainExpired, refuse
from distserve_worker.engine.runner import KVLayout, ModelRunner, PrefillOutput
from distserve_worker.engine.sampling import sample, sampling_from_proto
from distserve_worker.engine.scheduler import PrefillBatcher
from distserve_worker.kvtransfer.buffer import BufferTooSmall, KVBuffer
from distserve_worker.kvtransfer.prepared import prepare
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.peers import RankGroupBroken, StageChainBroken
from distserve_worker.pp.chain import StageChain
from distserve_worker.pp.pieces import layer_spans
from distserve_worker.settings import DecodeSettings, PrefillSettings
from distserve_worker.tp.group import RankGroup
from distserve_worker.tp.heads import prepared_by, rank_heads
from distserve_worker.tp.topology import broken_reason, topology


@dataclass
class Pending:
    prompt: list[int]
    sampling: gen.SamplingParams  # as the request gave it: sampled here, or by the last stage
    started: float = 0.0  # when its batch's forward began
    # Its cache (this stage's layers) and, with pipeline stages, the first token the last one sampled.
    done: asyncio.Future[tuple[PrefillOutput, int | None]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class PrefillWorker(gen_grpc.PrefillServiceServicer):
    def __init__(
        self,
        settings: PrefillSettings,
        runner: ModelRunner,
        layout: KVLayout,
        max_context: int,
        metrics: RuntimeMetrics,
        kv_heads: int = 0,
        group: RankGroup | None = None,
        encode: bool = True,
        chain: StageChain | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.settings = settings
        self.drain = drain or Drain(0)  # none given: never drains
        self.gave_up = ""  # why, once the drain deadline passed
        # False: caches are kept as tensors, for a decode engine in this same process (colocated)
        # to take without encoding; a pull from elsewhere then encodes them when it comes.
        self.encode = encode
        self.runner = runner
        self.layout = layout
        self.max_context = max_context
        self.metrics = metrics
        # Tensor parallelism: this rank's KV heads (model-wide) and the pieces of them that the
        # decode ranks will pull (one piece, all of them, when both run the same tp).
        self.kv_heads = kv_heads or layout.kv_heads
        self.own = rank_heads(self.kv_heads, settings.tp, 0)
        self.pieces = prepared_by(self.kv_heads, settings.tp, settings.decode_tp, 0)
        # Pipeline stages: this stage's layers, and the ranges of them decode stages will pull.
        self.layers = (runner.span.start, runner.span.end)
        self.spans = layer_spans(self.layers, settings.decode_layers, runner.span.total)
        self.group = group
        if group is not None:
            group.on_broken.append(self._broken)
        self.chain = chain
        if chain is not None:
            chain.on_broken.append(self._broken)
        self.downstream: set[asyncio.Task[None]] = set()
        self.buffer = KVBuffer(settings.kv_buffer_bytes, settings.kv_ttl_seconds)
        self.batcher = PrefillBatcher(settings.token_budget)
        self.pending: dict[str, Pending] = {}
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-forward")
        # Encoding a cache to its wire form (checksums + one copy) runs beside the next forward, not after it.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-encode")
        self.running = 0

    async def Prefill(
        self, request: gen.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> gen.PrefillResponse:
        arrived = time.perf_counter()
        prompt = list(request.prompt_token_ids)
        rid = request.request_id
        broken = self.broken
        if broken:
            self.metrics.request("error")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"prefill instance {self.settings.address}: {broken}"
            )
        if self.drain.draining:
            self.metrics.request("draining")
            await refuse(context, f"prefill instance {self.settings.address}")
        if not prompt or len(prompt) >= self.max_context:
            self.metrics.request("rejected")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt has {len(prompt)} tokens; it must have 1 to {self.max_context - 1}",
            )
        nbytes = len(prompt) * self.layout.bytes_per_token
        try:
            await self.buffer.reserve(rid, nbytes)
        except BufferTooSmall as exc:
            self.metrics.request("rejected")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        stored = False
        try:
            if self.gave_up:  # it waited for buffer room past the drain deadline: nothing done yet
                await refuse(context, f"prefill instance {self.settings.address}", self.gave_up)
            pending = Pending(prompt, request.sampling)
            self.pending[rid] = pending
            self.batcher.add(rid, len(prompt))
            self._update_queue()
            self.wake.set()
            try:
                out, first = await pending.done
            except (RankGroupBroken, StageChainBroken) as exc:
                # The instance broke under it: UNAVAILABLE, so the router retries it elsewhere.
                self.metrics.request("error")
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except DrainExpired as exc:
                self.metrics.request("error")
                await refuse(context, f"prefill instance {self.settings.address}", str(exc))
            started_forward = pending.started or arrived
            if first is None:
                assert out.last_logits is not None
                first = sample(out.last_logits, sampling_from_proto(pending.sampling), index=0)
            # Encoded once here, so a pull only streams bytes (see kvtransfer/codec.py).
            encoded: Any = out.kv
            if self.encode:
                encoded = await asyncio.get_running_loop().run_in_executor(
                    self.encoder,
                    prepare,
                    rid,
                    out.kv,
                    self.pieces,
                    self.own,
                    self.settings.max_chunk_bytes,
                    self.layers,
                    self.spans,
                )
            if self.gave_up:  # an answer now would point decode at a cache about to vanish
                self.metrics.request("error")
                await refuse(context, f"prefill instance {self.settings.address}", self.gave_up)
            self.buffer.store(rid, encoded, encoded.nbytes)
            stored = True
            self.metrics.request("ok")
            return gen.PrefillResponse(
                request_id=rid,
                first_token_id=first,
                prompt_tokens=len(prompt),
                kv_bytes=encoded.nbytes,
                kv_address=self.settings.address,
                prefill_seconds=time.perf_counter() - started_forward,
                queue_seconds=started_forward - arrived,
                kv_rank_addresses=self.group.addresses if self.group is not None else [],
                kv_stages=self.kv_stages(),
            )
        finally:
            self.pending.pop(rid, None)
            self.batcher.remove(rid)
            if not stored:
                await self.buffer.cancel(rid)
            self._update_queue()
            self.drain.changed()

    async def Status(self, request: gen.StatusRequest, context: grpc.aio.ServicerContext) -> gen.WorkerStatus:
        return self.status()

    @property
    def broken(self) -> str | None:
        """Why the instance cannot serve (a dead rank, a broken stage chain), or None."""
        return broken_reason(self.group, self.chain)

    def idle(self) -> bool:
        """Holds nothing: no prompt waiting or running, no cache reserved or waiting to be pulled."""
        return not self.pending and not self.buffer.entries and not self.buffer.waiting

    async def give_up(self, reason: str) -> int:
        """The drain deadline: prompts not yet answered are refused (the router retries them
        elsewhere); caches nobody pulled yet are released."""
        self.gave_up = reason
        error = DrainExpired(reason)
        given_up = 0
        for pending in self.pending.values():
            if not pending.done.done():
                pending.done.set_exception(error)
                given_up += 1
        for rid, entry in list(self.buffer.entries.items()):
            if entry.value is not None:
                await self.buffer.release(rid)
                given_up += 1
        return given_up

    def kv_stages(self) -> list[gen.KVStage]:
        if self.chain is None:
            return []
        ranks = self.group.addresses if self.group is not None else [self.settings.address]
        own = gen.KVStage(layer_start=self.layers[0], layer_end=self.layers[1], ranks=ranks)
        return self.chain.kv_stages(own)

    def _broken(self, reason: str) -> None:
        """A rank or a stage died: every prompt waiting here fails now, with the reason."""
        error = RankGroupBroken(f"prefill instance {self.settings.address}: {reason}")
        for pending in self.pending.values():
            if not pending.done.done():
                pending.done.set_exception(error)

    def status(self) -> gen.WorkerStatus:
        capacity = self.buffer.capacity // max(1, self.layout.bytes_per_token)
        return gen.WorkerStatus(
            **topology(
                self.settings,
                self.layout,
                self.runner,
                self.group,
                self.kv_heads,
                capacity,
                self.chain,
                self.drain.draining,
            ),
            role="prefill",
            model=self.settings.model.name,
            queued=len(self.batcher.queue) + self.buffer.waiting,
            running=self.running,
            free_slots=0,
            kv_used_bytes=self.buffer.used,
            kv_capacity_bytes=self.buffer.capacity,
            kv_entries=sum(1 for e in self.buffer.entries.values() if e.value is not None),
            max_context=self.max_context,
        )

    def _update_queue(self) -> None:
        self.metrics.set_queue(len(self.batcher.queue) + self.buffer.waiting)

    async def batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while ids := self.batcher.next_batch():
                batch = [(rid, self.pending[rid]) for rid in ids if rid in self.pending]
                if not batch:
                    continue
                now = time.perf_counter()
                for _, p in batch:
                    p.started = now
                self.running = len(batch)
                self.metrics.batch(len(batch))
                followers = None
                if self.group is not None:  # the followers run their shards of the same forward
                    seq = self.group.next_seq()
                    followers = asyncio.ensure_future(
                        self.group.prefill([(rid, p.prompt) for rid, p in batch], seq)
                    )
                try:
                    outs, hidden = await loop.run_in_executor(
                        self.executor, self.runner.prefill_stage, [p.prompt for _, p in batch]
                    )
                    if followers is not None:
                        await followers
                    longest = max(len(p.prompt) for _, p in batch)
                    self.metrics.forward(len(batch), longest, time.perf_counter() - now)
                except Exception as exc:  # a failed forward fails its batch, not the worker
                    if self.group is not None:  # ... unless its ranks are now out of step
                        if followers is not None:
                            followers.cancel()
                        reason = await self.group.fail_forward("prefill forward", exc)
                        exc = RankGroupBroken(f"prefill instance {self.settings.address}: {reason}")
                    for _, p in batch:
                        if not p.done.done():
                            p.done.set_exception(exc)
                    continue
                finally:
                    self.running = 0
                if self.chain is not None and hidden is not None:
                    # The later stages run it while this one takes the next batch (the pipeline).
                    task = asyncio.create_task(self._downstream(batch, outs, hidden))
                    self.downstream.add(task)
                    task.add_done_callback(self.downstream.discard)
                    continue
                for (_, p), out in zip(batch, outs, strict=True):
                    if not p.done.done():
                        p.done.set_result((out, None))

    async def _downstream(
        self, batch: list[tuple[str, Pending]], outs: list[PrefillOutput], hidden: Any
    ) -> None:
        """The rest of the pipeline for one batch: its first tokens, sampled by the last stage."""
        assert self.chain is not None
        work = stage_pb.PrefillWork(
            prompts=[
                stage_pb.Prompt(request_id=rid, token_ids=p.prompt, sampling=p.sampling) for rid, p in batch
            ]
        )
        try:
            tokens = await self.chain.forward(stage_pb.ForwardHeader(prefill=work), hidden)
        except Exception as exc:  # whatever it is, every prompt of the batch hears it: none hangs
            error = StageChainBroken(f"prefill instance {self.settings.address}: {exc}")
            for _, p in batch:
                if not p.done.done():
                    p.done.set_exception(error)
            return
        for (_, p), out, token in zip(batch, outs, tokens, strict=True):
            if not p.done.done():
                p.done.set_result((out, token))

    async def reap_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.kv_ttl_seconds / 4))
            await self.buffer.expire()

    def on_kv_sent(self, nbytes: int, seconds: float) -> None:
        self.metrics.kv_transfer(nbytes, seconds)


async def serve_prefill(settings: PrefillSettings, loaded: Any = None, drain: Drain | None = None) -> None:
    """Load the model (this rank's shard of it under tensor parallelism, the followers started
    beside it), serve gRPC (generation + KV transfer) and HTTP until cancelled or, after `drain`
    started (SIGTERM), drained."""
    from distserve_worker.engine.runner import probe_kv_layout
    from distserve_worker.kvtransfer.transport import KVTransferServicer, channel_options
    from distserve_worker.kvtransfer.transport import add_to_server as add_kv_transfer
    from distserve_worker.model_source import max_context
    from distserve_worker.serving import WorkerProcess, new_server, serve_until_stopped
    from distserve_worker.tp.launch import start_ranks

    if settings.stage > 0:  # a later pipeline stage: driven by stage 0, not by routers
        from distserve_worker.pp.stage import serve_stage

        await serve_stage("prefill", settings, drain)
        return
    server = new_server(channel_options(settings.max_chunk_bytes))
    async with WorkerProcess("prefill", settings, drain=drain) as process:
        process.group, model, _, kv_heads = await start_ranks("prefill", settings, loaded)
        runner = ModelRunner(model, settings.threads or None)
        layout = await asyncio.to_thread(probe_kv_layout, runner)
        worker = PrefillWorker(
            settings,
            runner,
            layout,
            max_context(model),
            process.metrics,
            kv_heads,
            process.group,
            chain=process.chain,
            drain=process.drain,
        )
        gen_grpc.add_PrefillServiceServicer_to_server(worker, server)
        add_kv_transfer(
            KVTransferServicer(
                worker.buffer,
                settings.max_chunk_bytes,
                worker.on_kv_sent,
                heads=worker.own,
                layers=worker.layers,
            ),
            server,
        )
        await serve_until_stopped(
            server,
            f"{settings.host}:{settings.port}",
            [worker.batch_loop, worker.reap_loop, *await process.loops()],
            state=process.state,
            label=instance_label("prefill", settings, runner),
            drain=process.drain,
            work=worker,
        )


def instance_label(role: str, settings: PrefillSettings | DecodeSettings, runner: ModelRunner) -> str:
    """How the start-up line names what this process runs."""
    parts = []
    if settings.tp > 1:
        parts.append(f"TP{settings.tp}")
    if settings.pp > 1:
        parts.append(f"stage 0/{settings.pp}, layers [{runner.span.start}, {runner.span.end})")
    return f"{role} ({', '.join(parts)})" if parts else role
