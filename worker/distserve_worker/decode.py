"""The decode instance: pulls KV caches when it has room and generates with continuous batching.

Lifecycle of a request:
1. `Decode` RPC: the first token (sampled by prefill) is streamed back at once; if it already ends
   the output (EOS, stop string, max_tokens of 1) the prefill instance's cache is released unpulled.
2. Otherwise the sequence waits for a slot (batch size and KV-token reservation, see scheduler.py).
3. Admitted, its KV cache is pulled from the prefill instance (checked chunk by chunk, see
   kvtransfer/codec.py) and released there; a failed pull fails this request only, with the reason.
4. It joins the batch: every step is ONE forward over all running sequences (left-padded cache,
   attention mask, per-row positions), then each row samples, detokenizes and checks its stops.
5. On EOS / stop string / max_tokens / context end it finishes and leaves the batch. A caller that
   goes away (router cancelled, client disconnected) aborts it at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_protos.rank.v1 import rank_pb2 as rank_pb
from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.kvcache import BatchedKV
from distserve_worker.engine.runner import KVLayout, ModelRunner
from distserve_worker.engine.sampling import SamplingParams, sample
from distserve_worker.engine.scheduler import DecodeScheduler
from distserve_worker.engine.sequence import Finish, Sequence
from distserve_worker.kvtransfer.reshard import pull_pieces
from distserve_worker.kvtransfer.transport import KVPuller, KVPullError
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.prefill import sampling_from_proto
from distserve_worker.settings import DecodeSettings
from distserve_worker.tp.group import RankGroup, RankGroupBroken
from distserve_worker.tp.heads import pieces_for
from distserve_worker.tp.topology import rank_infos

FINISH_PROTO = {Finish.STOP: gen.FINISH_REASON_STOP, Finish.LENGTH: gen.FINISH_REASON_LENGTH}


class Stream:
    """Per-request state the engine does not need: its sampling, stops and the queue to its caller."""

    def __init__(self, sampling: SamplingParams, detok: Detokenizer, ignore_eos: bool) -> None:
        self.sampling = sampling
        self.detok = detok
        self.ignore_eos = ignore_eos
        self.events: asyncio.Queue[gen.TokenEvent | Exception] = asyncio.Queue()
        self.kv_seconds = 0.0
        self.kv_bytes = 0


class DecodeWorker(gen_grpc.DecodeServiceServicer):
    def __init__(
        self,
        settings: DecodeSettings,
        runner: ModelRunner,
        tokenizer: Any,
        layout: KVLayout,
        max_context: int,
        eos: set[int],
        puller: KVPuller,
        metrics: RuntimeMetrics,
        kv_heads: int = 0,
        group: RankGroup | None = None,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.tokenizer = tokenizer
        self.layout = layout
        self.max_context = max_context
        self.eos = eos
        self.puller = puller
        self.metrics = metrics
        self.scheduler = DecodeScheduler(settings.max_batch, settings.max_kv_tokens)
        self.wake = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-forward")
        # The batch the last step ran on, and which sequences its rows are.
        self.batch: BatchedKV | None = None
        self.batch_rows: list[Sequence] = []
        self.pulls: set[asyncio.Task[None]] = set()
        # Tensor parallelism: the model's key/value heads, the follower ranks, and the batch changes
        # the followers must mirror before the next step (rows leave and join in the same order).
        self.kv_heads = kv_heads or layout.kv_heads
        self.group = group
        self.ops: list[rank_pb.BatchOp] = []
        self.new_batch = True
        if group is not None:
            group.on_broken.append(self._broken)

    # --- RPCs -------------------------------------------------------------------------------------

    async def Decode(self, request: gen.DecodeRequest, context: grpc.aio.ServicerContext) -> Any:
        rid = request.request_id or uuid.uuid4().hex
        stream = Stream(
            sampling_from_proto(request.sampling),
            Detokenizer(self.tokenizer, [s for s in request.stop if s]),
            request.ignore_eos,
        )
        seq = Sequence(
            request_id=rid,
            prompt_tokens=request.prompt_tokens,
            first_token=request.first_token_id,
            max_tokens=max(1, request.max_tokens),
            kv_address=request.kv_address,
            kv_sources=tuple(request.kv_rank_addresses),
        )
        seq.detok = stream
        if self.group is not None and self.group.broken:
            self.metrics.request("error")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"decode instance {self.settings.address}: {self.group.broken}"
            )
        if not self.scheduler.fits_ever(seq) or seq.prompt_tokens >= self.max_context:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request needs {seq.reserved_tokens} cached tokens; this decode instance holds at most "
                f"{min(self.settings.max_kv_tokens, self.max_context)}",
            )
        first = self._emit(seq, seq.first_token)
        if seq.finish is not None:
            await self._release(seq)
            yield self._final(first, seq)
            self.metrics.request("ok")
            return
        yield first
        self.scheduler.add(seq)
        # Admitted and pulling now, while the current step runs, so that the request can join the
        # very next step (admitting only between steps cost 1.5-2 steps per request).
        self._admit()
        self.wake.set()
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
            if not seq.finished:
                # The caller went away: free the slot now; the step loop drops the row.
                self.scheduler.finish(seq, Finish.ABORTED)
                self.wake.set()
            self._update_queue()

    async def Status(self, request: gen.StatusRequest, context: grpc.aio.ServicerContext) -> gen.WorkerStatus:
        return self.status()

    def _broken(self, reason: str) -> None:
        """A rank died: every request here fails now, with the reason; new ones are refused."""
        error = RuntimeError(f"decode instance {self.settings.address}: {reason}")
        for seq in [*self.scheduler.waiting, *self.scheduler.admitted]:
            self._fail(seq, error)
        self.wake.set()

    def status(self) -> gen.WorkerStatus:
        queued, running = self.scheduler.counts()
        s = self.settings
        layers = s.layers or (0, self.layout.num_layers)
        return gen.WorkerStatus(
            ready=self.group is None or self.group.broken is None,
            tp=s.tp,
            pp=s.pp,
            stage=s.stage,
            layer_start=layers[0],
            layer_end=layers[1],
            address=s.address,
            ranks=rank_infos(self.runner, self.group, self.kv_heads, s.max_kv_tokens, s.address),
            role="decode",
            model=self.settings.model.name,
            queued=queued,
            running=running,
            free_slots=self.scheduler.free_slots,
            kv_used_bytes=sum(q.cached_tokens for q in self.scheduler.admitted)
            * self.layout.bytes_per_token
            * s.tp,
            kv_capacity_bytes=self.settings.max_kv_tokens * self.layout.bytes_per_token * s.tp,
            kv_entries=len(self.scheduler.admitted),
            max_context=self.max_context,
        )

    # --- per token ----------------------------------------------------------------------------------

    def _emit(self, seq: Sequence, token: int) -> gen.TokenEvent:
        """The event for a newly sampled token (already appended to seq.output); finishes seq if it ends here."""
        stream: Stream = seq.detok
        text = stream.detok.add(token)
        finish = None
        if stream.detok.stopped or (token in self.eos and not stream.ignore_eos):
            finish = Finish.STOP
        elif len(seq.output) >= seq.max_tokens or seq.cached_tokens + 1 >= self.max_context:
            finish = Finish.LENGTH
        if finish is not None:
            text += stream.detok.flush()
            self.scheduler.finish(seq, finish)
        event = gen.TokenEvent(
            request_id=seq.request_id, token_id=token, text=text, index=len(seq.output) - 1
        )
        return self._final(event, seq) if finish is not None else event

    def _final(self, event: gen.TokenEvent, seq: Sequence) -> gen.TokenEvent:
        stream: Stream = seq.detok
        event.finish_reason = FINISH_PROTO.get(seq.finish or Finish.STOP, gen.FINISH_REASON_STOP)
        event.kv_transfer_seconds = stream.kv_seconds
        event.kv_transfer_bytes = stream.kv_bytes
        return event

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self.scheduler.finish(seq, Finish.ERROR)
        seq.detok.events.put_nowait(error)

    def _update_queue(self) -> None:
        self.metrics.set_queue(self.scheduler.counts()[0])

    # --- KV pulls -----------------------------------------------------------------------------------

    async def _pull(self, seq: Sequence) -> None:
        """Pull this instance's heads of the cache: rank 0's own pieces here, each follower's by
        itself (straight from the prefill ranks holding them), all at once; then release it."""
        addresses = list(seq.kv_sources) or [seq.kv_address]
        tp = self.settings.tp
        pieces = [pieces_for(self.kv_heads, len(addresses), tp, rank) for rank in range(tp)]
        started = time.perf_counter()
        timeout = self.settings.pull_timeout_seconds
        try:
            own = pull_pieces(
                self.puller,
                addresses,
                seq.request_id,
                seq.prompt_tokens,
                pieces[0],
                self.layout,
                self.settings.max_chunk_bytes,
                timeout,
            )
            followers = [
                self.group.pull(rank, seq.request_id, seq.prompt_tokens, pieces[rank], addresses, timeout)
                for rank in range(1, tp)
                if self.group is not None
            ]
            kv, *pulled = await asyncio.gather(own, *followers)
        except (KVPullError, RankGroupBroken) as exc:
            self._fail(seq, exc)
            self.wake.set()
            return
        seconds = time.perf_counter() - started
        await self._release(seq)
        stream: Stream = seq.detok
        stream.kv_seconds = seconds
        stream.kv_bytes = kv.nbytes + sum(p.bytes for p in pulled)
        self.metrics.kv_transfer(stream.kv_bytes, seconds)
        if seq.finished:  # aborted while pulling
            return
        seq.kv = kv
        self.scheduler.mark_ready(seq)
        self.wake.set()

    async def _release(self, seq: Sequence) -> None:
        """Every prefill rank frees its part of the cache (all decode ranks hold theirs now)."""
        addresses = list(seq.kv_sources) or [seq.kv_address]
        await asyncio.gather(*(self.puller.release(a, seq.request_id) for a in addresses))

    # --- the step loop ------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Admit the waiting requests that fit and start pulling their caches."""
        for seq in self.scheduler.admit():
            task = asyncio.create_task(self._pull(seq))
            self.pulls.add(task)
            task.add_done_callback(self.pulls.discard)
        self._update_queue()

    async def step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._admit()  # slots freed by the last step
            rows = self.scheduler.running()
            if not rows:
                self._drop_batch()
                self.wake.clear()
                await self.wake.wait()
                continue
            self._sync_batch(rows)
            assert self.batch is not None
            rows = list(self.batch_rows)
            self.metrics.batch(len(rows))
            started, width = time.perf_counter(), self.batch.span + 1
            last = [s.output[-1] for s in rows]
            followers = None
            if self.group is not None:  # the followers run their shards of the same step
                followers = asyncio.ensure_future(self.group.step(self.ops, last, self.new_batch))
                self.ops, self.new_batch = [], False
            try:
                logits = await loop.run_in_executor(self.executor, self.runner.decode_step, self.batch, last)
                if followers is not None:
                    await followers
                self.metrics.forward(len(rows), width, time.perf_counter() - started)
            except Exception as exc:  # a failed forward fails its batch, not the worker
                error = RuntimeError(f"decode step failed: {exc}")
                if self.group is not None:  # ... unless its ranks are now out of step
                    if followers is not None:
                        followers.cancel()
                    reason = await self.group.fail_forward("decode step", exc)
                    error = RuntimeError(f"decode instance {self.settings.address}: {reason}")
                for seq in rows:
                    self._fail(seq, error)
                self._drop_batch()
                continue
            self._postprocess(rows, logits)

    def _sync_batch(self, rows: list[Sequence]) -> None:
        """Make the batch's rows exactly `rows`: departed rows are dropped (the last row moves
        into the gap), newcomers' caches are copied in; rows already there are not touched."""
        keep = {id(s) for s in rows}
        i = 0
        while i < len(self.batch_rows):
            if id(self.batch_rows[i]) in keep:
                i += 1
                continue
            assert self.batch is not None
            self.batch.remove(i)
            self.ops.append(rank_pb.BatchOp(remove_row=i))
            last = self.batch_rows.pop()
            if i < len(self.batch_rows):
                self.batch_rows[i] = last
        present = {id(s) for s in self.batch_rows}
        for seq in rows:
            if id(seq) in present:
                continue
            assert seq.kv is not None
            if self.batch is None:
                self.batch = self.runner.empty_batch(seq.kv, self.settings.max_batch)
            self.batch.add(seq.kv)
            self.ops.append(rank_pb.BatchOp(add_request=seq.request_id))
            self.batch_rows.append(seq)
            seq.kv = None  # the batch holds it now

    def _drop_batch(self) -> None:
        """Forget the batch; the followers drop theirs with the next step (`new_batch`)."""
        self.batch, self.batch_rows = None, []
        self.ops, self.new_batch = [], True

    def _postprocess(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        for row, seq in enumerate(rows):
            if seq.finished:  # aborted during the step
                continue
            stream: Stream = seq.detok
            token = sample(logits[row], stream.sampling, index=len(seq.output))
            seq.output.append(token)
            stream.events.put_nowait(self._emit(seq, token))


async def serve_decode(settings: DecodeSettings, loaded: Any = None) -> None:
    from distserve_worker.engine.runner import probe_kv_layout
    from distserve_worker.health import start_http
    from distserve_worker.kvtransfer.transport import GrpcKVPuller
    from distserve_worker.model_source import eos_token_ids, max_context
    from distserve_worker.serving import serve_until_stopped
    from distserve_worker.tp.launch import start_ranks

    metrics = RuntimeMetrics("decode", settings.model.name, settings.instance or settings.address)
    state = {"ready": False}
    group: RankGroup | None = None
    http = await start_http(
        settings.host,
        settings.http_port,
        metrics,
        lambda: state["ready"] and (group is None or not group.broken),
    )
    server = grpc.aio.server()
    puller = GrpcKVPuller(settings.max_chunk_bytes)
    try:
        group, model, tokenizer, kv_heads = await start_ranks("decode", settings, loaded)
        runner = ModelRunner(model, settings.threads or None)
        layout = await asyncio.to_thread(probe_kv_layout, runner)
        worker = DecodeWorker(
            settings,
            runner,
            tokenizer,
            layout,
            max_context(model),
            eos_token_ids(model, tokenizer),
            puller,
            metrics,
            kv_heads,
            group,
        )
        gen_grpc.add_DecodeServiceServicer_to_server(worker, server)
        loops = [worker.step_loop]
        if group is not None:
            await group.connect(settings.address)
            loops.append(group.watch_loop)
        await serve_until_stopped(
            server,
            f"{settings.host}:{settings.port}",
            loops,
            state=state,
            label="decode" if group is None else f"decode (TP{settings.tp})",
        )
    finally:
        if group is not None:
            await group.close()
        await puller.close()
        await http.cleanup()
