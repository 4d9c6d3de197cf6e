"""The decode instance's gRPC side: a thin adapter over the decode engine (engine/decoder.py).

Lifecycle of a request (the engine's module says what happens inside it):
1. `Decode` RPC: the first token (sampled by prefill) is streamed back at once; if it already ends
   the output (EOS, stop string, max_tokens of 1) the prefill instance's cache is released unfetched.
2. Otherwise the sequence goes to the engine, which admits it when a slot and KV room are free,
   pulls its cache from the prefill rank(s) holding it (kvtransfer/source.py) and runs it in its
   batch, one token per step; each token event is streamed back as it comes.
3. A caller that goes away (router cancelled, client disconnected) aborts it at the next step; a
   failed pull, step or rank fails it with the reason.

Draining (SIGTERM, drain.py): new requests are refused before any token (the router sends them
elsewhere; their caches stay with prefill); the sequences it holds run to their end; the process
exits when none is left, or at the drain deadline, when the rest fail with the reason and the
caches of those never pulled are released.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.drain import Drain, refuse
from distserve_worker.engine.decoder import DecodeEngine, DecodeLimits, Stream
from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.runner import KVLayout, ModelRunner
from distserve_worker.engine.sampling import sampling_from_proto
from distserve_worker.engine.sequence import Sequence
from distserve_worker.kvtransfer.source import KVSource
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.pp.chain import StageChain
from distserve_worker.pp.pieces import SourceStage
from distserve_worker.settings import DecodeSettings
from distserve_worker.tp.group import RankGroup
from distserve_worker.tp.topology import broken_reason, topology


class DecodeWorker(gen_grpc.DecodeServiceServicer):
    def __init__(
        self,
        settings: DecodeSettings,
        runner: ModelRunner,
        tokenizer: Any,
        layout: KVLayout,
        max_context: int,
        eos: set[int],
        source: KVSource,
        metrics: RuntimeMetrics,
        kv_heads: int = 0,
        group: RankGroup | None = None,
        executor: ThreadPoolExecutor | None = None,
        chain: StageChain | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.settings = settings
        self.drain = drain or Drain(0)  # none given: never drains
        self.streams = 0  # Decode calls open (a drain waits for their last event to go out)
        self.runner = runner
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_context = max_context
        self.metrics = metrics
        self.kv_heads = kv_heads or layout.kv_heads
        self.group = group
        self.engine = DecodeEngine(
            runner,
            DecodeLimits(settings.max_batch, settings.max_kv_tokens, max_context),
            eos,
            source,
            metrics,
            executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-forward"),
            group,
            chain,
            micro_batches=chain.pp if chain is not None else 1,
        )
        self.chain = chain
        if group is not None:
            group.on_broken.append(self._broken)
        if chain is not None:
            chain.on_broken.append(self._broken)

    @property
    def broken(self) -> str | None:
        """Why the instance cannot serve (a dead rank, a broken stage chain), or None."""
        return broken_reason(self.group, self.chain)

    def _broken(self, reason: str) -> None:
        """A rank died: every request here fails now, with the reason; new ones are refused."""
        self.engine.fail_all(RuntimeError(f"decode instance {self.settings.address}: {reason}"))

    def idle(self) -> bool:
        """No sequence held and no Decode call open."""
        scheduler = self.engine.scheduler
        return self.streams == 0 and not scheduler.waiting and not scheduler.admitted

    async def give_up(self, reason: str) -> int:
        """The drain deadline: every sequence still here fails with the reason; the caches of those
        never pulled are released at their prefill instances (nobody will pull them now)."""
        scheduler = self.engine.scheduler
        unpulled = list(scheduler.waiting)
        given_up = len(unpulled) + len(scheduler.admitted)
        self.engine.fail_all(RuntimeError(f"decode instance {self.settings.address}: {reason}"))
        await asyncio.gather(*(self.engine.source.release(seq) for seq in unpulled))
        return given_up

    async def Decode(self, request: gen.DecodeRequest, context: grpc.aio.ServicerContext) -> Any:
        engine = self.engine
        seq = Sequence(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_tokens=request.prompt_tokens,
            first_token=request.first_token_id,
            max_tokens=max(1, request.max_tokens),
            kv_address=request.kv_address,
            kv_sources=tuple(request.kv_rank_addresses),
            kv_stages=tuple(
                SourceStage((s.layer_start, s.layer_end), tuple(s.ranks)) for s in request.kv_stages
            ),
        )
        stream = Stream(
            sampling_from_proto(request.sampling),
            Detokenizer(self.tokenizer, [s for s in request.stop if s]),
            request.ignore_eos,
        )
        seq.detok = stream
        broken = self.broken
        if broken:
            self.metrics.request("error")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"decode instance {self.settings.address}: {broken}"
            )
        if self.drain.draining:  # before any token: the router retries it on another instance
            self.metrics.request("draining")
            await refuse(context, f"decode instance {self.settings.address}")
        if not engine.fits_ever(seq):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request needs {seq.reserved_tokens} cached tokens; this decode instance holds at most "
                f"{min(self.settings.max_kv_tokens, self.max_context)}",
            )
        self.streams += 1
        try:
            first = engine.emit(seq, seq.first_token)
            if seq.finish is not None:
                await engine.source.release(seq)
                yield engine.final(first, seq)
                self.metrics.request("ok")
                return
            yield first
            engine.add(seq)
            try:
                while True:
                    event = await stream.events.get()
                    if isinstance(event, Exception):
                        self.metrics.request("error")
                        await context.abort(grpc.StatusCode.UNAVAILABLE, str(event))
                    yield event
                    if event.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                        self.metrics.request("ok")
                        return
            finally:
                engine.abort(seq)
                self.metrics.set_queue(engine.scheduler.counts()[0])
        finally:
            self.streams -= 1
            self.drain.changed()

    async def Status(self, request: gen.StatusRequest, context: grpc.aio.ServicerContext) -> gen.WorkerStatus:
        return self.status()

    def status(self) -> gen.WorkerStatus:
        s = self.settings
        now = self.engine.status()
        per_token = self.layout.bytes_per_token * s.tp  # all ranks' heads
        return gen.WorkerStatus(
            **topology(
                s,
                self.layout,
                self.runner,
                self.group,
                self.kv_heads,
                s.max_kv_tokens,
                self.chain,
                self.drain.draining,
            ),
            role="decode",
            model=s.model.name,
            queued=now["queued"],
            running=now["running"],
            free_slots=now["free_slots"],
            kv_used_bytes=now["cached_tokens"] * per_token,
            kv_capacity_bytes=s.max_kv_tokens * per_token,
            kv_entries=now["resident"],
            max_context=self.max_context,
        )


async def serve_decode(settings: DecodeSettings, loaded: Any = None, drain: Drain | None = None) -> None:
    from distserve_worker.engine.runner import probe_kv_layout
    from distserve_worker.kvtransfer.source import PullSource
    from distserve_worker.kvtransfer.transport import GrpcKVPuller
    from distserve_worker.model_source import eos_token_ids, max_context
    from distserve_worker.prefill import instance_label
    from distserve_worker.serving import WorkerProcess, new_server, serve_until_stopped
    from distserve_worker.tp.launch import start_ranks

    if settings.stage > 0:  # a later pipeline stage: driven by stage 0, not by routers
        from distserve_worker.pp.stage import serve_stage

        await serve_stage("decode", settings, drain)
        return
    server = new_server()
    puller = GrpcKVPuller(settings.max_chunk_bytes)
    async with WorkerProcess("decode", settings, drain=drain) as process:
        try:
            process.group, model, tokenizer, kv_heads = await start_ranks("decode", settings, loaded)
            runner = ModelRunner(model, settings.threads or None)
            layout = await asyncio.to_thread(probe_kv_layout, runner)
            worker = DecodeWorker(
                settings,
                runner,
                tokenizer,
                layout,
                max_context(model),
                eos_token_ids(model, tokenizer),
                PullSource(
                    puller,
                    layout,
                    kv_heads,
                    settings.tp,
                    process.group,
                    settings.max_chunk_bytes,
                    settings.pull_timeout_seconds,
                    span=runner.span,
                    chain=process.chain,
                ),
                process.metrics,
                kv_heads,
                process.group,
                chain=process.chain,
                drain=process.drain,
            )
            gen_grpc.add_DecodeServiceServicer_to_server(worker, server)
            await serve_until_stopped(
                server,
                f"{settings.host}:{settings.port}",
                [worker.engine.run, *await process.loops()],
                state=process.state,
                label=instance_label("decode", settings, runner),
                drain=process.drain,
                work=worker,
            )
        finally:
            await puller.close()
