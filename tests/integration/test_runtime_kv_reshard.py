"""KV pulls across tensor-parallel degrees over real gRPC on loopback (one process, one real KV
transfer server per prefill rank): for TP pairs up to 4 -> 2 and 2 -> 4, every decode rank ends up
with exactly its own heads of the cache, bit for bit, each piece pulled from the prefill rank that
holds it; a range the prefill rank did not prepare is refused with the reason."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.engine.runner import KVLayout
from distserve_worker.kvtransfer.buffer import KVBuffer
from distserve_worker.kvtransfer.codec import Expected
from distserve_worker.kvtransfer.prepared import prepare, slice_heads
from distserve_worker.kvtransfer.reshard import pull_pieces
from distserve_worker.kvtransfer.transport import (
    GrpcKVPuller,
    KVPullError,
    KVTransferServicer,
    add_to_server,
    channel_options,
)
from distserve_worker.tp.heads import Piece, pieces_for, prepared_by, rank_heads

LAYERS, HEADS, DIM, TOKENS, CHUNK = 3, 8, 16, 37, 1000


def whole_cache() -> SequenceKV:
    g = torch.Generator().manual_seed(7)
    return SequenceKV(
        [
            (torch.randn(HEADS, TOKENS, DIM, generator=g), torch.randn(HEADS, TOKENS, DIM, generator=g))
            for _ in range(LAYERS)
        ]
    )


async def prefill_ranks(kv: SequenceKV, prefill_tp: int, decode_tp: int):
    """One KV server per prefill rank, each holding its heads prepared for `decode_tp` ranks."""
    servers, addresses = [], []
    for rank in range(prefill_tp):
        own = rank_heads(HEADS, prefill_tp, rank)
        shard = SequenceKV([(k.contiguous(), v.contiguous()) for k, v in slice_heads(kv, *own).layers])
        held = prepare("r", shard, prepared_by(HEADS, prefill_tp, decode_tp, rank), own, CHUNK)
        buffer = KVBuffer(1 << 30, 60)
        await buffer.reserve("r", held.nbytes)
        buffer.store("r", held, held.nbytes)
        server = grpc.aio.server(options=channel_options(CHUNK))
        add_to_server(KVTransferServicer(buffer, CHUNK, heads=own), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    return servers, addresses


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (4, 1)]
)
async def test_each_decode_rank_gets_exactly_its_heads(prefill_tp, decode_tp):
    kv = whole_cache()
    servers, addresses = await prefill_ranks(kv, prefill_tp, decode_tp)
    layout = KVLayout(LAYERS, HEADS, DIM, torch.float32)
    pullers = [GrpcKVPuller(CHUNK) for _ in range(decode_tp)]  # one per decode rank
    try:
        got = await asyncio.gather(
            *(
                pull_pieces(
                    pullers[r],
                    addresses,
                    "r",
                    TOKENS,
                    pieces_for(HEADS, prefill_tp, decode_tp, r),
                    layout,
                    CHUNK,
                    10,
                )
                for r in range(decode_tp)
            )
        )
    finally:
        for p in pullers:
            await p.close()
        for s in servers:
            await s.stop(None)
    for rank, part in enumerate(got):
        start, end = rank_heads(HEADS, decode_tp, rank)
        for (k, v), (wk, wv) in zip(part.layers, kv.layers, strict=True):
            assert torch.equal(k, wk[start:end]) and torch.equal(v, wv[start:end])


async def test_a_head_range_the_rank_did_not_prepare_is_refused():
    kv = whole_cache()
    servers, addresses = await prefill_ranks(kv, 1, 2)  # prepared for decode TP2: halves
    puller = GrpcKVPuller(CHUNK)
    try:
        with pytest.raises(KVPullError, match=r"prepared KV \(heads, layers\) .* asked for \[\[0, 2\]"):
            await puller.pull(
                addresses[0], "r", Expected(LAYERS, TOKENS, 2, DIM, torch.float32, CHUNK), 10, heads=(0, 2)
            )
        # The halves it did prepare are there.
        layout = KVLayout(LAYERS, HEADS, DIM, torch.float32)
        part = await pull_pieces(puller, addresses, "r", TOKENS, [Piece(0, 4, 8)], layout, CHUNK, 10)
        assert torch.equal(part.layers[0][0], kv.layers[0][0][4:8])
    finally:
        await puller.close()
        for s in servers:
            await s.stop(None)
