"""Which pieces of a request's KV cache a decode rank pulls, across both pipeline stages and TP.

Pure arithmetic, no torch. A prefill instance's stage p holds layers [a_p, a_{p+1}) and its rank q
holds heads H_q of them; a decode stage s holds layers [c_s, c_{s+1}) and its rank r needs heads
H_r of those. The piece a decode rank pulls from one prefill rank is the intersection: the layers
both stages hold times the heads both ranks hold. Same splits on both sides (the common case):
exactly one piece per decode rank. Different pp (the paper's Algorithm 2 allows prefill and decode
segments of different depth) or different tp: several pieces, each pulled straight from the rank
that holds it and joined on arrival; the prefill side encodes exactly these pieces once
(`layer_spans`), so a pull only streams bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distserve_worker.tp.heads import pieces_for

LayerRange = tuple[int, int]  # [start, end) of the model's decoder layers


@dataclass(frozen=True)
class SourceStage:
    """One prefill stage as a KV source: its layers and its ranks' KV servers (rank 0 first)."""

    layers: LayerRange
    ranks: tuple[str, ...]


@dataclass(frozen=True)
class KVPiece:
    """Heads [head_start, head_end) of layers [layer_start, layer_end), held at `address`."""

    address: str
    heads: tuple[int, int]
    layers: LayerRange

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


def overlap(a: LayerRange, b: LayerRange) -> LayerRange | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def pieces_to_pull(
    sources: list[SourceStage], layers: LayerRange, kv_heads: int, decode_tp: int, rank: int
) -> list[KVPiece]:
    """What decode rank `rank` (of a stage holding `layers`) pulls, in layer order and, within a
    layer range, in head order: joining them along heads, then along layers, gives its cache."""
    out, covered = [], 0
    for source in sorted(sources, key=lambda s: s.layers):
        span = overlap(source.layers, layers)
        if span is None:
            continue
        covered += span[1] - span[0]
        for piece in pieces_for(kv_heads, len(source.ranks), decode_tp, rank):
            out.append(KVPiece(source.ranks[piece.source], (piece.start, piece.end), span))
    if covered != layers[1] - layers[0]:
        raise ValueError(
            f"the prefill stages' layers {[s.layers for s in sources]} do not cover layers {list(layers)} "
            "once: prefill and decode must serve the same model"
        )
    return out


def layer_spans(own_layers: LayerRange, decode_layers: Sequence[LayerRange], total: int) -> list[LayerRange]:
    """The layer ranges of a prefill stage's cache that decode stages will ask for, in order: its
    own layers cut at the decode stages' boundaries (no decode ranges: one decode stage holding all
    `total` layers). A prefill rank encodes each of them once for each decode head piece."""
    return [s for d in (list(decode_layers) or [(0, total)]) if (s := overlap(own_layers, d)) is not None]
