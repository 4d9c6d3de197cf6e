"""The decode engine: continuous batching over one model (or one tensor-parallel group), no gRPC.

    engine.add(seq)      # waits for a slot and KV room, then its cache is fetched (KVSource)
    await engine.step()  # schedule -> run -> postprocess: ONE forward over every running sequence

Lifecycle of a sequence: WAITING (slot and KV-token reservation, see scheduler.py) -> PULLING (its
cache fetched from the prefill side and released there) -> READY -> RUNNING (a row of the batch;
one token per step: sampled, detokenized, stop strings and EOS checked) -> FINISHED. Each token goes
to the sequence's `Stream` as a `TokenEvent`; a failure goes there as an exception. The gRPC
servicer (`decode.py`) is a thin adapter; tests drive the engine directly with a `LocalSource`.

Under tensor parallelism the engine also tells the follower ranks what changed in the batch since
the last step (rows leave and join in the same order on every rank) and runs its own shard of the
step while they run theirs.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.rank.v1 import rank_pb2 as rank_pb
from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.kvcache import BatchedKV
from distserve_worker.engine.runner import ModelRunner
from distserve_worker.engine.sampling import SamplingParams, sample
from distserve_worker.engine.scheduler import DecodeScheduler
from distserve_worker.engine.sequence import Finish, Sequence
from distserve_worker.kvtransfer.source import KVSource
from distserve_worker.kvtransfer.transport import KVPullError
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.tp.group import RankGroup, RankGroupBroken

FINISH_PROTO = {Finish.STOP: gen.FINISH_REASON_STOP, Finish.LENGTH: gen.FINISH_REASON_LENGTH}


class Stream:
    """Per-request state the scheduler does not need: sampling, stops, and the queue to its caller."""

    def __init__(self, sampling: SamplingParams, detok: Detokenizer, ignore_eos: bool) -> None:
        self.sampling = sampling
        self.detok = detok
        self.ignore_eos = ignore_eos
        self.events: asyncio.Queue[gen.TokenEvent | Exception] = asyncio.Queue()
        self.kv_seconds = 0.0
        self.kv_bytes = 0


@dataclass(frozen=True)
class DecodeLimits:
    max_batch: int
    max_kv_tokens: int
    max_context: int


@dataclass
class DecodeEngine:
    runner: ModelRunner
    limits: DecodeLimits
    eos: set[int]
    source: KVSource
    metrics: RuntimeMetrics
    executor: Executor
    group: RankGroup | None = None
    scheduler: DecodeScheduler = field(init=False)
    wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    # The batch the last step ran on, and which sequence each of its rows is.
    batch: BatchedKV | None = field(init=False, default=None)
    batch_rows: list[Sequence] = field(init=False, default_factory=list)
    pulls: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    # What the follower ranks must mirror before the next step.
    ops: list[rank_pb.BatchOp] = field(init=False, default_factory=list)
    new_batch: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.scheduler = DecodeScheduler(self.limits.max_batch, self.limits.max_kv_tokens)

    # --- requests ---------------------------------------------------------------------------------

    def fits_ever(self, seq: Sequence) -> bool:
        return self.scheduler.fits_ever(seq) and seq.prompt_tokens < self.limits.max_context

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (its first token already emitted); its fetch starts as soon as it is
        admitted, while the current step runs, so it can join the very next step (admitting only
        between steps cost 1.5-2 steps per request)."""
        self.scheduler.add(seq)
        self._admit()
        self.wake.set()

    def abort(self, seq: Sequence) -> None:
        """The caller went away: the slot is free now; the next step drops the row."""
        if not seq.finished:
            self.scheduler.finish(seq, Finish.ABORTED)
            self.wake.set()

    def fail_all(self, error: Exception) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.admitted]:
            self._fail(seq, error)
        self.wake.set()

    # --- per token --------------------------------------------------------------------------------

    def emit(self, seq: Sequence, token: int) -> gen.TokenEvent:
        """The event for a newly sampled token (already in seq.output); finishes seq if it ends here."""
        stream: Stream = seq.detok
        text = stream.detok.add(token)
        finish = None
        if stream.detok.stopped or (token in self.eos and not stream.ignore_eos):
            finish = Finish.STOP
        elif len(seq.output) >= seq.max_tokens or seq.cached_tokens + 1 >= self.limits.max_context:
            finish = Finish.LENGTH
        if finish is not None:
            text += stream.detok.flush()
            self.scheduler.finish(seq, finish)
        event = gen.TokenEvent(
            request_id=seq.request_id, token_id=token, text=text, index=len(seq.output) - 1
        )
        return self.final(event, seq) if finish is not None else event

    def final(self, event: gen.TokenEvent, seq: Sequence) -> gen.TokenEvent:
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

    # --- KV caches --------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Admit the waiting sequences that fit and start fetching their caches."""
        for seq in self.scheduler.admit():
            task = asyncio.create_task(self._fetch(seq))
            self.pulls.add(task)
            task.add_done_callback(self.pulls.discard)
        self._update_queue()

    async def _fetch(self, seq: Sequence) -> None:
        started = time.perf_counter()
        try:
            fetched = await self.source.fetch(seq)
        except (KVPullError, RankGroupBroken) as exc:
            self._fail(seq, exc)
            self.wake.set()
            return
        seconds = time.perf_counter() - started
        await self.source.release(seq)
        stream: Stream = seq.detok
        stream.kv_seconds, stream.kv_bytes = seconds, fetched.nbytes
        if fetched.nbytes:
            self.metrics.kv_transfer(fetched.nbytes, seconds)
        if seq.finished:  # aborted while fetching
            return
        seq.kv = fetched.kv
        self.scheduler.mark_ready(seq)
        self.wake.set()

    # --- the step ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Step while there is work; sleep until `add` (or a fetch, or an abort) wakes it."""
        while True:
            if not await self.step():
                self.wake.clear()
                await self.wake.wait()

    async def step(self) -> bool:
        """One decode step over every running sequence; False when there was nothing to run."""
        self._admit()  # slots freed by the last step
        rows = self._schedule()
        if not rows:
            return False
        logits = await self._run(rows)
        if logits is not None:
            self._postprocess(rows, logits)
        return True

    def _schedule(self) -> list[Sequence]:
        """Make the batch's rows exactly the running sequences: departed rows are dropped (the last
        row moves into the gap), newcomers' caches are copied in; rows already there stay put."""
        rows = self.scheduler.running()
        if not rows:
            self._drop_batch()
            return []
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
                self.batch = self.runner.empty_batch(seq.kv, self.limits.max_batch)
            self.batch.add(seq.kv)
            self.ops.append(rank_pb.BatchOp(add_request=seq.request_id))
            self.batch_rows.append(seq)
            seq.kv = None  # the batch holds it now
        return list(self.batch_rows)

    async def _run(self, rows: list[Sequence]) -> torch.Tensor | None:
        """The forward (rank 0's shard of it while the followers run theirs); None when it failed,
        which fails its rows, not the engine (unless the ranks are now out of step)."""
        assert self.batch is not None
        self.metrics.batch(len(rows))
        started, width = time.perf_counter(), self.batch.span + 1
        last = [s.output[-1] for s in rows]
        followers = None
        if self.group is not None:
            followers = asyncio.ensure_future(self.group.step(self.ops, last, self.new_batch))
            self.ops, self.new_batch = [], False
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self.executor, self.runner.decode_step, self.batch, last)
            if followers is not None:
                await followers
        except Exception as exc:
            error: Exception = RuntimeError(f"decode step failed: {exc}")
            if self.group is not None:
                if followers is not None:
                    followers.cancel()
                error = RuntimeError(await self.group.fail_forward("decode step", exc))
            for seq in rows:
                self._fail(seq, error)
            self._drop_batch()
            return None
        self.metrics.forward(len(rows), width, time.perf_counter() - started)
        return logits

    def _postprocess(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        for row, seq in enumerate(rows):
            if seq.finished:  # aborted during the step
                continue
            stream: Stream = seq.detok
            token = sample(logits[row], stream.sampling, index=len(seq.output))
            seq.output.append(token)
            stream.events.put_nowait(self.emit(seq, token))

    def _drop_batch(self) -> None:
        """Forget the batch; the followers drop theirs with the next step (`new_batch`)."""
        self.batch, self.batch_rows = None, []
        self.ops, self.new_batch = [], True

    def status(self) -> dict[str, Any]:
        queued, running = self.scheduler.counts()
        return {
            "queued": queued,
            "running": running,
            "free_slots": self.scheduler.free_slots,
            "cached_tokens": sum(q.cached_tokens for q in self.scheduler.admitted),
            "resident": len(self.scheduler.admitted),
        }
