"""Which key/value heads each tensor-parallel rank holds, and where a decode rank pulls them from.

Pure arithmetic, no torch. Rank r of a TP-t instance holds the contiguous heads
[r * H/t, (r + 1) * H/t) of every layer (`tp/shard.py` slices k_proj/v_proj that way), so a decode
rank under another TP needs one or more contiguous pieces of one or more prefill ranks:

    prefill TP1 -> decode TP2: decode rank 0 takes heads [0, H/2) of prefill rank 0, rank 1 [H/2, H)
    prefill TP2 -> decode TP1: decode rank 0 takes prefill rank 0's heads, then prefill rank 1's
    prefill TP2 -> decode TP4: decode rank j takes half of prefill rank j // 2's heads

Each piece is pulled straight from the prefill rank holding it; nothing is gathered through rank 0.
A prefill rank prepares (encodes once) exactly the pieces the decode ranks will ask it for.
"""

from __future__ import annotations

from dataclasses import dataclass

HeadRange = tuple[int, int]  # [start, end) of the model's key/value heads


def rank_heads(kv_heads: int, tp: int, rank: int) -> HeadRange:
    if kv_heads % tp:
        raise ValueError(f"TP{tp} does not divide {kv_heads} key/value heads")
    per = kv_heads // tp
    return rank * per, (rank + 1) * per


@dataclass(frozen=True)
class Piece:
    """Heads [start, end) of the model, held by prefill rank `source`."""

    source: int
    start: int
    end: int

    @property
    def heads(self) -> int:
        return self.end - self.start


def pieces_for(kv_heads: int, prefill_tp: int, decode_tp: int, decode_rank: int) -> list[Piece]:
    """The pieces decode rank `decode_rank` pulls, in head order (their concatenation is its heads)."""
    want_start, want_end = rank_heads(kv_heads, decode_tp, decode_rank)
    out = []
    for source in range(prefill_tp):
        start, end = rank_heads(kv_heads, prefill_tp, source)
        lo, hi = max(start, want_start), min(end, want_end)
        if lo < hi:
            out.append(Piece(source, lo, hi))
    return out


def prepared_by(kv_heads: int, prefill_tp: int, decode_tp: int, prefill_rank: int) -> list[Piece]:
    """The pieces prefill rank `prefill_rank` is asked for by the decode ranks (one per decode rank
    that needs some of its heads); together they are exactly its own heads, each once."""
    return [
        piece
        for rank in range(decode_tp)
        for piece in pieces_for(kv_heads, prefill_tp, decode_tp, rank)
        if piece.source == prefill_rank
    ]
