"""A prefill rank's KV cache, encoded once into the pieces decode ranks will pull.

When prefill and decode run the same tensor-parallel degree, decode rank r pulls all of prefill
rank r's heads: one piece, today's `EncodedKV`. When they differ, decode ranks ask for parts of a
prefill rank's heads (`tp/heads.py`); the prefill rank encodes exactly those parts once, right after
its forward, so a pull only streams bytes whatever the two degrees are, and the pieces together are
the rank's heads once (no extra memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.kvtransfer.codec import EncodedKV, encode_cache
from distserve_worker.tp.heads import HeadRange, Piece


@dataclass(frozen=True)
class PreparedKV:
    """Encoded pieces of one rank's heads, by the model-wide head range each covers."""

    pieces: dict[HeadRange, EncodedKV]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces.values())


def slice_heads(kv: SequenceKV, start: int, end: int) -> SequenceKV:
    """Heads [start, end) of a rank-local cache ([heads, tokens, head_dim] per tensor): a head slice
    of a contiguous tensor is contiguous, so encoding it copies nothing extra."""
    return SequenceKV([(k[start:end], v[start:end]) for k, v in kv.layers])


def prepare(
    request_id: str, kv: SequenceKV, pieces: list[Piece], own: HeadRange, max_chunk_bytes: int
) -> EncodedKV | PreparedKV:
    """Encode the pieces of this rank's cache (`own`: the model-wide heads it holds)."""
    if len(pieces) == 1 and (pieces[0].start, pieces[0].end) == own:
        return encode_cache(request_id, kv, max_chunk_bytes)
    return PreparedKV(
        {
            (p.start, p.end): encode_cache(
                request_id, slice_heads(kv, p.start - own[0], p.end - own[0]), max_chunk_bytes
            )
            for p in pieces
        }
    )
