"""A follower rank (1..tp-1) of a tensor-parallel instance: `python -m distserve_worker.tp.follower CONFIG`.

Started by rank 0 (`tp/group.py`), never by hand. It joins the instance's process group, holds its
shard of the weights, and runs what rank 0 sends it (`distserve.rank.v1`):

- prefill: `Prefill` runs the batch's forward (its heads), encodes the pieces of its KV cache that
  decode ranks will pull and serves them itself (`distserve.kvtransfer.v1` on its own port);
- decode: `Pull` pulls this rank's heads of a request's cache from the prefill ranks holding them;
  `Step` applies rank 0's batch changes (rows leave and join in the same order) and runs the step.

A forward that fails here leaves the ranks' collectives out of step, so the follower exits at
once: rank 0's own collective then fails instead of hanging, and the instance reports broken.

Its life is rank 0's: it exits when rank 0 closes the pipe on its stdin (rank 0 closing, drained or
stopped) or goes away (the pipe closes with it). SIGTERM does not stop it: a pod's processes all
receive it at once (and `distserve up` signals the process group), while rank 0 drains and needs
its followers for every forward until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any

import grpc
import torch

from distserve_protos.rank.v1 import rank_pb2 as pb
from distserve_protos.rank.v1 import rank_pb2_grpc as pb_grpc
from distserve_worker.engine.kvcache import BatchedKV, SequenceKV
from distserve_worker.engine.runner import KVLayout, ModelRunner, PrefillOutput, probe_kv_layout
from distserve_worker.kvtransfer.buffer import KVBuffer
from distserve_worker.kvtransfer.memory import keep_freed_memory
from distserve_worker.kvtransfer.prepared import prepare
from distserve_worker.kvtransfer.reshard import pull_kv_pieces
from distserve_worker.kvtransfer.transport import (
    GrpcKVPuller,
    KVPullError,
    KVTransferServicer,
    channel_options,
)
from distserve_worker.kvtransfer.transport import add_to_server as add_kv_transfer
from distserve_worker.model_source import ModelSpec
from distserve_worker.pp.pieces import KVPiece, layer_spans
from distserve_worker.settings import DecodeSettings, PrefillSettings
from distserve_worker.tp.heads import prepared_by, rank_heads
from distserve_worker.tp.ranks import RankPlace, join, kv_heads_of, load_shard, receive_hidden

UNBOUNDED = 1 << 62  # rank 0's buffer bounds the instance; a follower's only mirrors it


def settings_from(role: str, data: dict[str, Any]) -> PrefillSettings | DecodeSettings:
    cls = PrefillSettings if role == "prefill" else DecodeSettings
    known = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k in known}
    values["model"] = ModelSpec(**data["model"])
    if values.get("layers") is not None:
        values["layers"] = tuple(values["layers"])
    values["stage_addresses"] = tuple(values.get("stage_addresses", ()))
    if "decode_layers" in values:
        values["decode_layers"] = tuple(tuple(span) for span in values["decode_layers"])
    return cls(**values)


class Turnstile:
    """Lets forwards through in rank 0's order (`seq`), whatever order their RPCs arrive in."""

    def __init__(self) -> None:
        self.next = 0
        self.changed = asyncio.Condition()

    async def wait(self, seq: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.next >= seq)

    async def passed(self) -> None:
        async with self.changed:
            self.next += 1
            self.changed.notify_all()


class Follower(pb_grpc.RankServiceServicer):
    def __init__(
        self,
        role: str,
        settings: PrefillSettings | DecodeSettings,
        place: RankPlace,
        runner: ModelRunner,
        layout: KVLayout,
        kv_heads: int,
    ) -> None:
        self.role = role
        self.settings = settings
        self.place = place
        self.runner = runner
        self.layout = layout
        self.kv_heads = kv_heads
        self.own = rank_heads(kv_heads, place.world, place.rank)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank-forward")
        # Encoding the KV pieces runs beside the next forward, off the loop that serves pulls.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank-encode")
        self.buffer = KVBuffer(UNBOUNDED, getattr(settings, "kv_ttl_seconds", 60.0))
        self.puller = GrpcKVPuller(settings.max_chunk_bytes)
        self.pulled: dict[str, tuple[SequenceKV, float]] = {}
        self.batches: dict[int, BatchedKV | None] = {}  # one per pipeline micro-batch (lane)
        self.turn = Turnstile()
        self.layers = runner.span.start, runner.span.end  # this stage's layers, model-wide
        self.address = ""

    def die(self, what: str) -> None:
        """A failed forward: leave, so rank 0's collective fails instead of waiting for us."""
        print(f"[distserve] rank {self.place.rank}: {what}; exiting", flush=True)
        traceback.print_exc()
        os._exit(3)

    # --- prefill ------------------------------------------------------------------------------------

    def _input(self, shape: list[int]) -> torch.Tensor | None:
        """A later pipeline stage's input hidden states, broadcast by rank 0 (in the forward thread)."""
        if not shape:
            return None
        return receive_hidden(list(shape), self.runner.dtype, self.runner.device)

    def _prefill(self, prompts: list[list[int]], shape: list[int]) -> list[PrefillOutput]:
        return self.runner.prefill(prompts, self._input(shape))

    async def _in_turn(self, seq: int, job: Callable[[], Any]) -> Any:
        """Run `job` in the forward thread in rank 0's order of forwards."""
        await self.turn.wait(seq)
        future = asyncio.get_running_loop().run_in_executor(self.executor, job)
        await self.turn.passed()
        return await future

    async def Prefill(self, request: pb.PrefillBatch, context: grpc.aio.ServicerContext) -> pb.Ack:
        loop = asyncio.get_running_loop()
        prompts = [list(p.token_ids) for p in request.prompts]
        try:
            outs = await self._in_turn(
                request.seq, functools.partial(self._prefill, prompts, list(request.hidden_shape))
            )
        except Exception:
            self.die("prefill forward failed")
        assert isinstance(self.settings, PrefillSettings)
        pieces = prepared_by(self.kv_heads, self.place.world, self.settings.decode_tp, self.place.rank)
        spans = layer_spans(self.layers, self.settings.decode_layers, self.runner.span.total)
        for prompt, out in zip(request.prompts, outs, strict=True):
            encoded = await loop.run_in_executor(
                self.encoder,
                prepare,
                prompt.request_id,
                out.kv,
                pieces,
                self.own,
                self.settings.max_chunk_bytes,
                self.layers,
                spans,
            )
            if prompt.request_id in self.buffer.entries:  # a retried id whose release missed us
                await self.buffer.release(prompt.request_id)
            await self.buffer.reserve(prompt.request_id, encoded.nbytes)
            self.buffer.store(prompt.request_id, encoded, encoded.nbytes)
        return pb.Ack()

    # --- decode -------------------------------------------------------------------------------------

    async def Pull(self, request: pb.PullKV, context: grpc.aio.ServicerContext) -> pb.Pulled:
        started = time.perf_counter()
        pieces = [
            KVPiece(s.address, (s.head_start, s.head_end), (s.layer_start, s.layer_end))
            for s in request.sources
        ]
        try:
            kv = await pull_kv_pieces(
                self.puller,
                request.request_id,
                request.num_tokens,
                pieces,
                self.layout,
                self.settings.max_chunk_bytes,
                getattr(self.settings, "pull_timeout_seconds", 30.0),
            )
        except KVPullError as exc:
            # ABORTED: this request's pull failed; the rank itself is fine (UNAVAILABLE would mean it is not).
            await context.abort(grpc.StatusCode.ABORTED, f"rank {self.place.rank}: {exc}")
        self.pulled[request.request_id] = (kv, time.monotonic())
        return pb.Pulled(bytes=kv.nbytes, seconds=time.perf_counter() - started)

    def _step(self, request: pb.DecodeStep) -> None:
        """Rank 0's batch changes to this lane's batch, then the step (in the forward thread, in order)."""
        assert isinstance(self.settings, DecodeSettings)
        batch = None if request.new_batch else self.batches.get(request.lane)
        for op in request.ops:
            if op.WhichOneof("op") == "remove_row":
                assert batch is not None
                batch.remove(op.remove_row)
            else:
                kv, _ = self.pulled.pop(op.add_request)
                if batch is None:
                    batch = self.runner.empty_batch(kv, self.settings.max_batch)
                batch.add(kv)
        self.batches[request.lane] = batch
        assert batch is not None
        self.runner.decode_step(batch, list(request.last_tokens), self._input(list(request.hidden_shape)))

    async def Step(self, request: pb.DecodeStep, context: grpc.aio.ServicerContext) -> pb.Ack:
        try:
            await self._in_turn(request.seq, functools.partial(self._step, request))
        except Exception:
            self.die("decode step failed")
        return pb.Ack()

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RankDescription:
        capacity = getattr(self.settings, "max_kv_tokens", 0) or (
            getattr(self.settings, "kv_buffer_bytes", 0) // max(1, self.layout.bytes_per_token)
        )
        return pb.RankDescription(
            rank=self.place.rank,
            device=str(self.place.device),
            parameters=self.runner.parameters,
            kv_capacity_tokens=capacity,
            address=self.address,
            kv_head_start=self.own[0],
            kv_head_end=self.own[1],
        )

    async def reap_loop(self) -> None:
        ttl = getattr(self.settings, "kv_ttl_seconds", 60.0)
        while True:
            await asyncio.sleep(1.0)
            await self.buffer.expire()
            now = time.monotonic()
            for rid in [r for r, (_, at) in self.pulled.items() if now - at > ttl]:
                self.pulled.pop(rid, None)  # pulled for a request that never joined (aborted)


def _exit_with_rank0() -> None:
    """Rank 0 closed our stdin, or is gone (killed, crashed; the pipe closes with it): nothing can
    drive this rank any more."""
    with contextlib.suppress(OSError):
        while os.read(sys.stdin.fileno(), 4096):
            pass
    os._exit(0)


def advertised(settings: PrefillSettings | DecodeSettings, port: int) -> str:
    host = settings.address.rsplit(":", 1)[0]
    return f"{host}:{port}"


async def serve(role: str, settings: PrefillSettings | DecodeSettings, place: RankPlace) -> None:
    store = await asyncio.to_thread(join, place)
    model, _ = await asyncio.to_thread(load_shard, settings.model, place, settings.layers)
    runner = ModelRunner(model, settings.threads or None)
    layout = await asyncio.to_thread(probe_kv_layout, runner)  # the same start-up forward as rank 0
    follower = Follower(role, settings, place, runner, layout, kv_heads_of(model))
    from distserve_worker.serving import bind, new_server  # here: serving starts rank groups

    server = new_server(channel_options(settings.max_chunk_bytes))
    pb_grpc.add_RankServiceServicer_to_server(follower, server)
    if role == "prefill":
        add_kv_transfer(
            KVTransferServicer(
                follower.buffer, settings.max_chunk_bytes, heads=follower.own, layers=follower.layers
            ),
            server,
        )
    port = settings.rank_port_base + place.rank if settings.rank_port_base else 0
    bound = bind(server, f"{settings.host}:{port}", "--rank-port-base")
    await server.start()
    follower.address = advertised(settings, bound)
    store.set(f"rank/{place.rank}", follower.address)
    print(f"[distserve] {role} rank {place.rank} serving gRPC on {follower.address}", flush=True)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGTERM,
        lambda: print(f"[distserve] rank {place.rank}: SIGTERM: serving until rank 0 closes", flush=True),
    )
    reaper = asyncio.create_task(follower.reap_loop())
    try:
        await server.wait_for_termination()
    finally:
        reaper.cancel()


def main(argv: list[str] | None = None) -> int:
    config = json.loads((argv or sys.argv[1:])[0])
    role = config["role"]
    settings = settings_from(role, config["settings"])
    place = RankPlace(config["rank"], settings.tp, config["store_port"])
    # Until serve() installs its own handler: a SIGTERM while loading must not stop the rank either.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_rank0, daemon=True).start()
    keep_freed_memory(settings.max_chunk_bytes)
    asyncio.run(serve(role, settings, place))
    sys.stdout.flush()
    os._exit(0)  # skip the process group's C++ destructors (they can abort at interpreter exit)


if __name__ == "__main__":
    raise SystemExit(main())
