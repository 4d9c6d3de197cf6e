"""The colocated baseline: one process does both phases (vLLM-style), to measure whether
disaggregation pays against the same core budget.

It is the prefill and decode workers themselves, sharing one model, one runner and ONE forward
thread: a prefill forward and a decode step never run at once, so a prompt stalls every running
decode exactly as in a colocated engine. The process serves PrefillService, DecodeService and
KVTransferService on one gRPC port; the router lists it as both its prefill and its decode
instance. The decode half takes a cache its own prefill half holds in-process, as tensors (no
encoding, no loopback gRPC, no copy: a colocated engine has no transfer at all); one that another
colocated instance holds (the router may pair them) is pulled over gRPC.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from distserve_worker.drain import Drain
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.settings import DecodeSettings, PrefillSettings


@dataclass(frozen=True)
class ColocatedSettings:
    """Prefill and decode settings of one process: same host, gRPC port and HTTP port."""

    prefill: PrefillSettings
    decode: DecodeSettings


class _BothMetrics:
    """/metrics of the process: the prefill half's series, then the decode half's."""

    def __init__(self, *parts: RuntimeMetrics) -> None:
        self.parts = parts

    def exposition(self) -> bytes:
        return b"".join(p.exposition() for p in self.parts)

    def forwards(self) -> object:
        return [p.forwards() for p in self.parts]


class _BothHalves:
    """The drain's view of the process (drain.py): idle when both halves hold nothing."""

    def __init__(self, *halves: Any) -> None:
        self.halves = halves

    def idle(self) -> bool:
        return all(h.idle() for h in self.halves)

    async def give_up(self, reason: str) -> int:
        # Decode first: its sequences' caches are released at the prefill half, which then
        # releases what is left.
        return sum([await h.give_up(reason) for h in reversed(self.halves)])


async def serve_colocated(
    settings: ColocatedSettings, loaded: Any = None, drain: Drain | None = None
) -> None:
    """Serve both phases until cancelled or, after `drain` started (SIGTERM), drained: new
    requests refused at once, what it holds finished (drain.py)."""

    from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
    from distserve_worker.decode import DecodeWorker
    from distserve_worker.engine.runner import ModelRunner, probe_kv_layout
    from distserve_worker.health import start_http
    from distserve_worker.kvtransfer.source import LocalFirstSource, LocalSource, PullSource
    from distserve_worker.kvtransfer.transport import GrpcKVPuller, KVTransferServicer, channel_options
    from distserve_worker.kvtransfer.transport import add_to_server as add_kv_transfer
    from distserve_worker.model_source import eos_token_ids, load_model, max_context
    from distserve_worker.prefill import PrefillWorker
    from distserve_worker.serving import new_server, serve_until_stopped

    p, d = settings.prefill, settings.decode
    instance = p.instance or p.address
    prefill_metrics = RuntimeMetrics("prefill", p.model.name, instance)
    decode_metrics = RuntimeMetrics("decode", p.model.name, instance)
    state = {"ready": False}
    drain = drain or Drain(0)  # none given (a test): never drains
    metrics: Any = _BothMetrics(prefill_metrics, decode_metrics)
    http = await start_http(p.host, p.http_port, metrics, lambda: state["ready"] and not drain.draining)
    server = new_server(channel_options(p.max_chunk_bytes))
    puller = GrpcKVPuller(d.max_chunk_bytes)
    try:
        model, tokenizer = loaded or await asyncio.to_thread(load_model, p.model)
        runner = ModelRunner(model, p.threads or None)
        layout = probe_kv_layout(runner)
        context = max_context(model)
        prefill = PrefillWorker(p, runner, layout, context, prefill_metrics, encode=False, drain=drain)
        remote = PullSource(
            puller, layout, layout.kv_heads, 1, None, d.max_chunk_bytes, d.pull_timeout_seconds
        )
        decode = DecodeWorker(
            d,
            runner,
            tokenizer,
            layout,
            context,
            eos_token_ids(model, tokenizer),
            LocalFirstSource(LocalSource(prefill.buffer), remote, p.address),
            decode_metrics,
            # The point of the baseline: one forward thread for both phases (FIFO: a waiting
            # prefill runs after at most one decode step, then decode resumes).
            executor=prefill.executor,
            drain=drain,
        )
        gen_grpc.add_PrefillServiceServicer_to_server(prefill, server)
        gen_grpc.add_DecodeServiceServicer_to_server(decode, server)
        add_kv_transfer(KVTransferServicer(prefill.buffer, p.max_chunk_bytes, prefill.on_kv_sent), server)
        await serve_until_stopped(
            server,
            f"{p.host}:{p.port}",
            [prefill.batch_loop, prefill.reap_loop, decode.engine.run],
            state=state,
            label="colocated (prefill + decode)",
            drain=drain,
            work=_BothHalves(prefill, decode),
        )
    finally:
        await puller.close()
        await http.cleanup()
