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
from typing import TYPE_CHECKING, Any

import torch

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.rank.v1 import rank_pb2 as rank_pb
from distserve_protos.stage.v1 import stage_pb2 as stage_pb
from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.kvcache import BatchedKV
from distserve_worker.engine.runner import ModelRunner
from distserve_worker.engine.sampling import SamplingParams, sample, sampling_to_proto
from distserve_worker.engine.scheduler import DecodeScheduler
from distserve_worker.engine.sequence import Finish, SeqStatus, Sequence
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.peers import KVPullError, RankGroupBroken, StageChainBroken

if TYPE_CHECKING:  # annotations only: the engine itself needs no gRPC
    from distserve_worker.kvtransfer.source import KVSource
    from distserve_worker.pp.chain import StageChain
    from distserve_worker.tp.group import RankGroup

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
class Lane:
    """One micro-batch: its batch, which sequence each row is, and what the other ranks and stages
    must mirror before its next step. Without pipeline stages there is one lane; with pp stages
    there are pp, circulating through the stages at once (while stage 1 runs lane A, stage 0 runs
    lane B), so the stages work in parallel as the planner assumes."""

    index: int
    batch: BatchedKV | None = None
    rows: list[Sequence] = field(default_factory=list)
    ops: list[rank_pb.BatchOp] = field(default_factory=list)  # tensor-parallel followers
    stage_ops: list[stage_pb.RowOp] = field(default_factory=list)  # later pipeline stages
    new_batch: bool = True
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def drop(self) -> None:
        """Forget the batch; the followers and later stages drop theirs with the next step."""
        self.batch, self.rows = None, []
        self.ops, self.stage_ops, self.new_batch = [], [], True


@dataclass
class DecodeEngine:
    runner: ModelRunner
    limits: DecodeLimits
    eos: set[int]
    source: KVSource
    metrics: RuntimeMetrics
    executor: Executor
    group: RankGroup | None = None
    chain: StageChain | None = None  # the later pipeline stages (pp > 1)
    micro_batches: int = 1  # lanes in flight at once: pp with pipeline stages
    scheduler: DecodeScheduler = field(init=False)
    lanes: list[Lane] = field(init=False, default_factory=list)
    pulls: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    releases: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.scheduler = DecodeScheduler(self.limits.max_batch, self.limits.max_kv_tokens)
        self.lanes = [Lane(i) for i in range(max(1, self.micro_batches))]

    @property
    def batch(self) -> BatchedKV | None:
        """The first lane's batch (the only one without pipeline stages)."""
        return self.lanes[0].batch

    def wake_all(self) -> None:
        for lane in self.lanes:
            lane.wake.set()

    # --- requests ---------------------------------------------------------------------------------

    def fits_ever(self, seq: Sequence) -> bool:
        return self.scheduler.fits_ever(seq) and seq.prompt_tokens < self.limits.max_context

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (its first token already emitted); its fetch starts as soon as it is
        admitted, while the current step runs, so it can join the very next step (admitting only
        between steps cost 1.5-2 steps per request)."""
        self.scheduler.add(seq)
        self._admit()
        self.wake_all()

    def abort(self, seq: Sequence) -> None:
        """The caller went away: the slot is free now; the next step drops the row. A cache not
        pulled yet is released at once: nobody will pull it now, and its prefill instance would
        otherwise hold it until its deadline (and, draining, wait for it)."""
        if not seq.finished:
            unpulled = seq.status is SeqStatus.WAITING
            self.scheduler.finish(seq, Finish.ABORTED)
            if unpulled:
                task = asyncio.create_task(self.source.release(seq))
                self.releases.add(task)
                task.add_done_callback(self.releases.discard)
            self.wake_all()

    def fail_all(self, error: Exception) -> None:
        for seq in [*self.scheduler.waiting, *self.scheduler.admitted]:
            self._fail(seq, error)
        for lane in self.lanes:
            lane.drop()
        self.wake_all()

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
        except (KVPullError, RankGroupBroken, StageChainBroken) as exc:
            self._fail(seq, exc)
            self.wake_all()
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
        self.wake_all()

    # --- the step ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Step every lane while there is work; a lane sleeps until `add` (or a fetch, or an abort)
        wakes it."""
        await asyncio.gather(*(self._lane_loop(lane) for lane in self.lanes))

    async def _lane_loop(self, lane: Lane) -> None:
        while True:
            if not await self.step(lane):
                lane.wake.clear()
                await lane.wake.wait()

    async def step(self, lane: Lane | None = None) -> bool:
        """One decode step over every running sequence of `lane` (the first by default); False when
        there was nothing to run."""
        lane = lane or self.lanes[0]
        self._admit()  # slots freed by the last step
        rows = self._schedule(lane)
        if not rows:
            return False
        out = await self._run(lane, rows)
        if out is not None:
            self._postprocess(rows, out)
        return True

    def _assign(self, running: list[Sequence]) -> None:
        """A sequence that starts running joins the lane with the fewest rows (it stays there)."""
        if len(self.lanes) == 1:
            for seq in running:
                seq.lane = 0
            return
        counts = [0] * len(self.lanes)
        for seq in running:
            if seq.lane >= 0:
                counts[seq.lane] += 1
        for seq in running:
            if seq.lane < 0:
                seq.lane = counts.index(min(counts))
                counts[seq.lane] += 1

    def _schedule(self, lane: Lane) -> list[Sequence]:
        """Make the lane's rows exactly its running sequences: departed rows are dropped (the last
        row moves into the gap), newcomers' caches are copied in; rows already there stay put."""
        running = self.scheduler.running()
        self._assign(running)
        rows = [s for s in running if s.lane == lane.index]
        if not rows:
            lane.drop()
            return []
        keep = {id(s) for s in rows}
        i = 0
        while i < len(lane.rows):
            if id(lane.rows[i]) in keep:
                i += 1
                continue
            assert lane.batch is not None
            lane.batch.remove(i)
            lane.ops.append(rank_pb.BatchOp(remove_row=i))
            lane.stage_ops.append(stage_pb.RowOp(remove_row=i))
            last = lane.rows.pop()
            if i < len(lane.rows):
                lane.rows[i] = last
        present = {id(s) for s in lane.rows}
        for seq in rows:
            if id(seq) in present:
                continue
            assert seq.kv is not None
            if lane.batch is None:
                lane.batch = self.runner.empty_batch(seq.kv, self.limits.max_batch)
            lane.batch.add(seq.kv)
            lane.ops.append(rank_pb.BatchOp(add_request=seq.request_id))
            if self.chain is not None:
                stream: Stream = seq.detok
                add = stage_pb.AddRow(request_id=seq.request_id, sampling=sampling_to_proto(stream.sampling))
                lane.stage_ops.append(stage_pb.RowOp(add=add))
            lane.rows.append(seq)
            seq.kv = None  # the batch holds it now
        return list(lane.rows)

    async def _run(self, lane: Lane, rows: list[Sequence]) -> torch.Tensor | list[int] | None:
        """The forward (rank 0's shard of it while the followers run theirs; then, with pipeline
        stages, the rest of the chain): logits, or the tokens the last stage sampled. None when it
        failed, which fails its rows, not the engine (unless the ranks are now out of step)."""
        assert lane.batch is not None
        self.metrics.batch(len(rows))
        started, width = time.perf_counter(), lane.batch.span + 1
        last = [s.output[-1] for s in rows]
        followers = None
        new_batch = lane.new_batch
        stage_ops, lane.stage_ops = lane.stage_ops, []
        if self.group is not None:
            seq_no = self.group.next_seq()  # right before the submit below: ranks keep this order
            followers = asyncio.ensure_future(self.group.step(lane.ops, last, new_batch, seq_no, lane.index))
        lane.ops, lane.new_batch = [], False
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self.executor, self.runner.decode_step, lane.batch, last)
            if followers is not None:
                await followers
            if self.chain is not None:
                work = stage_pb.DecodeWork(
                    lane=lane.index,
                    ops=stage_ops,
                    new_batch=new_batch,
                    sample_index=[len(s.output) for s in rows],
                )
                out = await self.chain.forward(stage_pb.ForwardHeader(decode=work), out)
        except Exception as exc:
            error: Exception = RuntimeError(f"decode step failed: {exc}")
            if isinstance(exc, StageChainBroken):
                error = RuntimeError(str(exc))
            elif self.group is not None:
                if followers is not None:
                    followers.cancel()
                error = RuntimeError(await self.group.fail_forward("decode step", exc))
            for seq in rows:
                self._fail(seq, error)
            lane.drop()
            return None
        self.metrics.forward(len(rows), width, time.perf_counter() - started)
        return out

    def _postprocess(self, rows: list[Sequence], out: torch.Tensor | list[int]) -> None:
        """Logits are sampled here; a pipeline's last stage has sampled already (token ids)."""
        for row, seq in enumerate(rows):
            if seq.finished:  # aborted during the step
                continue
            stream: Stream = seq.detok
            if isinstance(out, list):
                token = out[row]
            else:
                token = sample(out[row], stream.sampling, index=len(seq.output))
            seq.output.append(token)
            stream.events.put_nowait(self.emit(seq, token))

    def status(self) -> dict[str, Any]:
        queued, running = self.scheduler.counts()
        return {
            "queued": queued,
            "running": running,
            "free_slots": self.scheduler.free_slots,
            "cached_tokens": sum(q.cached_tokens for q in self.scheduler.admitted),
            "resident": len(self.scheduler.admitted),
        }
