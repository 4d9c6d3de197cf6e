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
from distserve_worker.engine.runner import KVLayout, ModelRunner, PrefillOutput
from distserve_worker.engine.sampling import SamplingParams, sample
from distserve_worker.engine.scheduler import PrefillBatcher
from distserve_worker.kvtransfer.buffer import BufferTooSmall, KVBuffer
from distserve_worker.kvtransfer.codec import encode_cache
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.settings import PrefillSettings


def sampling_from_proto(p: gen.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature, top_p=p.top_p or 1.0, seed=p.seed if p.HasField("seed") else None
    )


@dataclass
class Pending:
    prompt: list[int]
    sampling: SamplingParams
    started: float = 0.0  # when its batch's forward began
    done: asyncio.Future[PrefillOutput] = field(
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
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.layout = layout
        self.max_context = max_context
        self.metrics = metrics
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
            pending = Pending(prompt, sampling_from_proto(request.sampling))
            self.pending[rid] = pending
            self.batcher.add(rid, len(prompt))
            self._update_queue()
            self.wake.set()
            out = await pending.done
            started_forward = pending.started or arrived
            first = sample(out.last_logits, pending.sampling, index=0)
            # Encoded once here, so a pull only streams bytes (see kvtransfer/codec.py).
            encoded = await asyncio.get_running_loop().run_in_executor(
                self.encoder, encode_cache, rid, out.kv, self.settings.max_chunk_bytes
            )
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
            )
        finally:
            self.pending.pop(rid, None)
            self.batcher.remove(rid)
            if not stored:
                await self.buffer.cancel(rid)
            self._update_queue()

    async def Status(self, request: gen.StatusRequest, context: grpc.aio.ServicerContext) -> gen.WorkerStatus:
        return self.status()

    def status(self) -> gen.WorkerStatus:
        return gen.WorkerStatus(
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
                try:
                    outs = await loop.run_in_executor(
                        self.executor, self.runner.prefill, [p.prompt for _, p in batch]
                    )
                    longest = max(len(p.prompt) for _, p in batch)
                    self.metrics.forward(len(batch), longest, time.perf_counter() - now)
                except Exception as exc:  # a failed forward fails its batch, not the worker
                    for _, p in batch:
                        if not p.done.done():
                            p.done.set_exception(exc)
                    continue
                finally:
                    self.running = 0
                for (_, p), out in zip(batch, outs, strict=True):
                    if not p.done.done():
                        p.done.set_result(out)

    async def reap_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.kv_ttl_seconds / 4))
            await self.buffer.expire()

    def on_kv_sent(self, nbytes: int, seconds: float) -> None:
        self.metrics.kv_transfer(nbytes, seconds)


async def serve_prefill(settings: PrefillSettings, loaded: Any = None) -> None:
    """Load the model, serve gRPC (generation + KV transfer) and HTTP until cancelled."""
    from distserve_worker.engine.runner import probe_kv_layout
    from distserve_worker.health import start_http
    from distserve_worker.kvtransfer.transport import KVTransferServicer, channel_options
    from distserve_worker.kvtransfer.transport import add_to_server as add_kv_transfer
    from distserve_worker.model_source import load_model, max_context
    from distserve_worker.serving import serve_until_stopped

    metrics = RuntimeMetrics("prefill", settings.model.name, settings.instance or settings.address)
    state = {"ready": False}
    http = await start_http(settings.host, settings.http_port, metrics, lambda: state["ready"])
    server = grpc.aio.server(options=channel_options(settings.max_chunk_bytes))
    try:
        model, _ = loaded or await asyncio.to_thread(load_model, settings.model)
        runner = ModelRunner(model, settings.threads or None)
        worker = PrefillWorker(settings, runner, probe_kv_layout(runner), max_context(model), metrics)
        gen_grpc.add_PrefillServiceServicer_to_server(worker, server)
        add_kv_transfer(
            KVTransferServicer(worker.buffer, settings.max_chunk_bytes, worker.on_kv_sent), server
        )
        await serve_until_stopped(
            server,
            f"{settings.host}:{settings.port}",
            [worker.batch_loop, worker.reap_loop],
            state=state,
            label="prefill",
        )
    finally:
        await http.cleanup()
