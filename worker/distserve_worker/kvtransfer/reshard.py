"""The decode side of a KV pull across tensor-parallel degrees and pipeline stages: pull this
rank's pieces and join them.

A decode rank's heads may live on several prefill ranks (prefill TP2 -> decode TP1) or be part of
one prefill rank's heads (TP1 -> TP2); `tp/heads.py` says which. Its stage's layers may live on
several prefill stages (`pp/pieces.py`). Each piece is pulled straight from the prefill rank that
holds it, checked chunk by chunk as any pull; pieces of one layer range are joined along the head
dimension (a copy only when there is more than one), the ranges then put one after the other.
"""

from __future__ import annotations

import asyncio

import torch

from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.engine.runner import KVLayout
from distserve_worker.kvtransfer.codec import Expected
from distserve_worker.kvtransfer.transport import KVPuller
from distserve_worker.pp.pieces import KVPiece
from distserve_worker.tp.heads import Piece


def join_heads(parts: list[SequenceKV]) -> SequenceKV:
    if len(parts) == 1:
        return parts[0]
    return SequenceKV(
        [
            (torch.cat([p.layers[i][0] for p in parts]), torch.cat([p.layers[i][1] for p in parts]))
            for i in range(len(parts[0].layers))
        ]
    )


async def pull_pieces(
    puller: KVPuller,
    addresses: list[str],
    request_id: str,
    num_tokens: int,
    pieces: list[Piece],
    layout: KVLayout,
    max_chunk_bytes: int,
    timeout: float,
) -> SequenceKV:
    """Pull head `pieces` of every layer (of the prefill ranks at `addresses`) concurrently."""
    whole = (0, layout.num_layers)
    kv_pieces = [KVPiece(addresses[p.source], (p.start, p.end), whole) for p in pieces]
    return await pull_kv_pieces(puller, request_id, num_tokens, kv_pieces, layout, max_chunk_bytes, timeout)


async def pull_kv_pieces(
    puller: KVPuller,
    request_id: str,
    num_tokens: int,
    pieces: list[KVPiece],
    layout: KVLayout,
    max_chunk_bytes: int,
    timeout: float,
) -> SequenceKV:
    """Pull `pieces` (heads x layers, `pp/pieces.py`) concurrently and join them into this rank's
    cache: heads within a layer range, then the ranges in order. KVPullError if one fails."""

    def expected(piece: KVPiece) -> Expected:
        return Expected(
            num_layers=piece.num_layers,
            num_tokens=num_tokens,
            kv_heads=piece.num_heads,
            head_dim=layout.head_dim,
            dtype=layout.dtype,
            max_chunk_bytes=max_chunk_bytes,
        )

    parts = await asyncio.gather(
        *(
            puller.pull(p.address, request_id, expected(p), timeout, heads=p.heads, layers=p.layers)
            for p in pieces
        )
    )
    spans: dict[tuple[int, int], list[SequenceKV]] = {}
    for piece, part in zip(pieces, parts, strict=True):
        spans.setdefault(piece.layers, []).append(part)
    layers = []
    for span in sorted(spans):
        layers.extend(join_heads(spans[span]).layers)
    return SequenceKV(layers)
