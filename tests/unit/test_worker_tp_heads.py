"""Which KV heads each decode rank pulls from which prefill rank (tp/heads.py): pure arithmetic."""

from __future__ import annotations

import itertools

import pytest

from distserve_worker.tp.heads import Piece, pieces_for, prepared_by, rank_heads

PAIRS = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (1, 4), (4, 1), (8, 2)]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), PAIRS)
def test_each_decode_rank_gets_exactly_its_heads(prefill_tp, decode_tp):
    heads = 8
    for rank in range(decode_tp):
        pieces = pieces_for(heads, prefill_tp, decode_tp, rank)
        start, end = rank_heads(heads, decode_tp, rank)
        # In head order, contiguous, covering exactly this rank's heads.
        assert pieces[0].start == start and pieces[-1].end == end
        assert all(a.end == b.start for a, b in itertools.pairwise(pieces))
        for p in pieces:  # each from the prefill rank that holds those heads
            held = rank_heads(heads, prefill_tp, p.source)
            assert held[0] <= p.start < p.end <= held[1]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), PAIRS)
def test_a_prefill_rank_prepares_its_own_heads_once(prefill_tp, decode_tp):
    heads = 8
    for rank in range(prefill_tp):
        pieces = prepared_by(heads, prefill_tp, decode_tp, rank)
        assert sorted((p.start, p.end) for p in pieces) == sorted({(p.start, p.end) for p in pieces})
        assert sum(p.heads for p in pieces) == heads // prefill_tp


def test_examples():
    assert pieces_for(4, 1, 2, 1) == [Piece(0, 2, 4)]  # TP1 -> TP2: the second half of rank 0's heads
    assert pieces_for(4, 2, 1, 0) == [Piece(0, 0, 2), Piece(1, 2, 4)]  # TP2 -> TP1: both ranks, in order
    assert pieces_for(4, 2, 4, 3) == [Piece(1, 3, 4)]
    with pytest.raises(ValueError, match="TP3 does not divide 4"):
        rank_heads(4, 3, 0)
