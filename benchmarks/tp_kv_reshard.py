"""Benchmark: a KV pull that reshards heads between tensor-parallel degrees vs a same-TP pull of the
same cache, in one run.

Two prefill "ranks" run as child processes on loopback, each a real KV transfer server holding the
cache of one request (a SmolLM2-sized layout with 4 key/value heads so that TP2 splits it: 30
layers, head dim 64, float32, 1,024 tokens = 60 MiB), prepared exactly as a prefill rank prepares
it (kvtransfer/prepared.py: encoded once, per piece the decode ranks will ask for; not timed):

- same TP (TP1 -> TP1): one decode rank pulls the whole cache from one prefill rank;
- TP1 -> TP2: two decode ranks (two pullers, concurrently) each pull half the heads of one rank;
- TP2 -> TP1: one decode rank pulls both prefill ranks' heads concurrently and joins them.

The decode side is the real path (`kvtransfer/reshard.pull_pieces`: every chunk checked, tensors
assembled). Each round runs the three back to back; ratios are medians of per-round throughput
ratios (bytes of the whole cache / wall time), so load changes between rounds do not skew them.

    .venv/bin/python benchmarks/tp_kv_reshard.py [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import torch

LAYERS, KV_HEADS, DIM, TOKENS = 30, 4, 64, 1024
MiB = 1024 * 1024
CHUNK = 2 * MiB


def make_kv():
    from distserve_worker.engine.kvcache import SequenceKV

    g = torch.Generator().manual_seed(0)
    return SequenceKV(
        [
            (torch.randn(KV_HEADS, TOKENS, DIM, generator=g), torch.randn(KV_HEADS, TOKENS, DIM, generator=g))
            for _ in range(LAYERS)
        ]
    )


def serve(rank: int) -> None:
    """Prefill rank `rank` of TP2 (heads [2r, 2r+2)); rank 0 also plays the TP1 prefill instance."""
    import grpc

    from distserve_worker.kvtransfer.buffer import KVBuffer
    from distserve_worker.kvtransfer.prepared import prepare, slice_heads
    from distserve_worker.kvtransfer.transport import KVTransferServicer, add_to_server, channel_options
    from distserve_worker.tp.heads import prepared_by

    kv = make_kv()

    async def main() -> None:
        buffer = KVBuffer(1 << 36, ttl_seconds=1e9)
        entries = {}
        if rank == 0:  # the TP1 instance: for a TP1 decode, and for a TP2 decode
            entries["same"] = prepare("same", kv, prepared_by(KV_HEADS, 1, 1, 0), (0, KV_HEADS), CHUNK)
            entries["1to2"] = prepare("1to2", kv, prepared_by(KV_HEADS, 1, 2, 0), (0, KV_HEADS), CHUNK)
        own = (rank * 2, rank * 2 + 2)
        mine = slice_heads(kv, *own).layers
        shard = type(kv)([(k.contiguous(), v.contiguous()) for k, v in mine])
        entries["2to1"] = prepare("2to1", shard, prepared_by(KV_HEADS, 2, 1, rank), own, CHUNK)
        for rid, value in entries.items():
            await buffer.reserve(rid, value.nbytes)
            buffer.store(rid, value, value.nbytes)
        server = grpc.aio.server(options=channel_options(CHUNK))
        add_to_server(KVTransferServicer(buffer, CHUNK), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"port": port}), flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


async def rounds(addresses: list[str], runs: int) -> dict[str, list[float]]:
    from distserve_worker.engine.runner import KVLayout
    from distserve_worker.kvtransfer.reshard import pull_pieces
    from distserve_worker.kvtransfer.transport import GrpcKVPuller
    from distserve_worker.tp.heads import pieces_for

    layout = KVLayout(LAYERS, KV_HEADS, DIM, torch.float32)
    pullers = [GrpcKVPuller(CHUNK), GrpcKVPuller(CHUNK)]  # one per decode rank, as two processes

    async def pull(rid: str, sources: list[str], prefill_tp: int, decode_tp: int) -> None:
        parts = await asyncio.gather(
            *(
                pull_pieces(
                    pullers[rank],
                    sources,
                    rid,
                    TOKENS,
                    pieces_for(KV_HEADS, prefill_tp, decode_tp, rank),
                    layout,
                    CHUNK,
                    120,
                )
                for rank in range(decode_tp)
            )
        )
        assert sum(p.layers[0][0].shape[0] for p in parts) == KV_HEADS

    cases = {
        "same": lambda: pull("same", addresses[:1], 1, 1),
        "1to2": lambda: pull("1to2", addresses[:1], 1, 2),
        "2to1": lambda: pull("2to1", addresses, 2, 1),
    }
    out: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for i in range(runs + 1):  # round 0 opens the channels and warms up: not counted
            for name, case in cases.items():
                started = time.perf_counter()
                await case()
                if i:
                    out[name].append(time.perf_counter() - started)
    finally:
        for p in pullers:
            await p.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--serve", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from distserve_worker.kvtransfer.memory import keep_freed_memory

    keep_freed_memory(CHUNK)  # as every worker process does at start
    if args.serve >= 0:
        serve(args.serve)
        return
    children = [
        subprocess.Popen([sys.executable, __file__, "--serve", str(r)], stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        addresses = [f"127.0.0.1:{json.loads(c.stdout.readline())['port']}" for c in children]  # type: ignore[union-attr]
        r = asyncio.run(rounds(addresses, args.runs))
    finally:
        for c in children:
            c.kill()
            c.wait(timeout=10)
    nbytes = make_kv().nbytes
    med = {k: statistics.median(v) for k, v in r.items()}
    ratios = {
        k: statistics.median(s / t for s, t in zip(r["same"], r[k], strict=True)) for k in ("1to2", "2to1")
    }
    print(
        f"KV pull of one request's cache ({nbytes / MiB:.0f} MiB), median of {args.runs} rounds, load {os.getloadavg()[0]:.1f}:"
    )
    for name, label in (
        ("same", "same TP (TP1 -> TP1)"),
        ("1to2", "TP1 -> TP2 (two ranks)"),
        ("2to1", "TP2 -> TP1 (two sources)"),
    ):
        rel = "" if name == "same" else f"   {100 * ratios[name]:.0f}% of same-TP throughput"
        print(f"  {label:28} {med[name] * 1e3:7.0f} ms  {nbytes / MiB / med[name]:6.0f} MiB/s{rel}")
    print(json.dumps({"bytes": nbytes, "seconds": med, "ratio_vs_same_tp": ratios, "per_round": r}))


if __name__ == "__main__":
    main()
