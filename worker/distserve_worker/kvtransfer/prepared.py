"""A prefill rank's KV cache, encoded once into the pieces decode ranks will pull.

When prefill and decode run the same tensor-parallel degree and the same stages, decode rank r
pulls all of prefill rank r's cache: one piece, an `EncodedKV`. When they differ, decode ranks ask
for parts of a prefill rank's heads (`tp/heads.py`) and of its stage's layers (`pp/pieces.py`); the
prefill rank encodes exactly those parts once, right after its forward, so a pull only streams bytes
whatever the two shapes are, and the pieces together are the rank's cache once (no extra memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.kvtransfer.codec import EncodedKV, encode_cache
from distserve_worker.tp.heads import HeadRange, Piece

PieceKey = tuple[HeadRange, tuple[int, int]]  # (heads, layers), both model-wide [start, end)


@dataclass(frozen=True)
class PreparedKV:
    """Encoded pieces of one rank's cache, by the model-wide heads and layers each covers."""

    pieces: dict[PieceKey, EncodedKV]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces.values())


def slice_heads(kv: SequenceKV, start: int, end: int) -> SequenceKV:
    """Heads [start, end) of a rank-local cache ([heads, tokens, head_dim] per tensor): a head slice
    of a contiguous tensor is contiguous, so encoding it copies nothing extra."""
    return SequenceKV([(k[start:end], v[start:end]) for k, v in kv.layers])


def prepare(
    request_id: str,
    kv: SequenceKV,
    pieces: list[Piece],
    own: HeadRange,
    max_chunk_bytes: int,
    own_layers: tuple[int, int] | None = None,
    layer_spans: list[tuple[int, int]] | None = None,
) -> EncodedKV | PreparedKV:
    """Encode the pieces of this rank's cache (`own`: the model-wide heads it holds; `own_layers`:
    the model-wide layers its stage holds, all of `kv`'s by default). `layer_spans`: the layer
    ranges the decode stages will ask for (one, all of them, by default)."""
    held = own_layers or (0, len(kv.layers))
    spans = layer_spans or [held]
    if len(pieces) == 1 and (pieces[0].start, pieces[0].end) == own and spans == [held]:
        return encode_cache(request_id, kv, max_chunk_bytes)
    out = {}
    for lo, hi in spans:
        layers = SequenceKV(kv.layers[lo - held[0] : hi - held[0]])
        for p in pieces:
            out[((p.start, p.end), (lo, hi))] = encode_cache(
                request_id, slice_heads(layers, p.start - own[0], p.end - own[0]), max_chunk_bytes
            )
    return PreparedKV(out)
