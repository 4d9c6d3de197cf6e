"""Per-request KV caches and the batched, padded cache a decode step runs on.

A request's cache is a `SequenceKV`: per layer a (keys, values) pair shaped [kv_heads, tokens,
head_dim], unpadded. That is what prefill holds, what KV transfer moves, and what decode stores.

A decode step runs ONE forward over all running requests: `BatchedKV`. Their lengths differ, so
each row's cache is right-aligned at a column shared by all rows and the columns before it are
masked out; each row's position ids continue from its own length.

Why preallocated buffers rather than transformers' `DynamicCache`: a `DynamicCache` grows by
`torch.cat`, which copies the whole batch's cache on every step (O(batch x context) per token),
and a padded batch has to be rebuilt whenever a request joins or leaves. Measured on SmolLM2 at
31 rows, rebuilds alone stalled the decode loop for up to 1.2 s and took a fifth of its time. Here a
step writes one column per layer into spare room, a joining request copies only its own cache
into a free row, a leaving one is replaced by the last row (one row copied), and the live region
is moved back in place when it reaches the end of the buffers (amortised: the room grows with
the context); new buffers only when the live span outgrows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# [kv_heads, tokens, head_dim] per tensor
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SequenceKV:
    layers: list[LayerKV]

    @property
    def num_tokens(self) -> int:
        return int(self.layers[0][0].shape[1]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def cache_to_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (keys, values) of every layer of a transformers cache, [batch, kv_heads, tokens, head_dim]."""
    return [(layer.keys, layer.values) for layer in cache.layers]


# Columns beyond twice the live span that a (re)allocation adds on the right: room for this many
# steps before the live region has to be moved back to the left. Unused room is never touched, so
# it costs address space only.
RIGHT_ROOM = 1024
MIN_ROWS = 4


class _BatchLayer(DynamicLayer):
    """One layer of a `BatchedKV` as transformers sees it: `update` writes the new tokens at the
    batch's end column (room is reserved before the forward) and returns the live view."""

    def __init__(self, batch: BatchedKV, index: int) -> None:
        super().__init__()
        self.batch = batch
        self.index = index
        self.is_initialized = True
        self.keys = self.values = None

    def _views(self, new_tokens: int = 0) -> None:
        b = self.batch
        if not b.buffers:
            return
        keys, values = b.buffers[self.index]
        self.keys = keys[: b.rows, :, b.start : b.end + new_tokens]
        self.values = values[: b.rows, :, b.start : b.end + new_tokens]
        self.dtype, self.device = keys.dtype, keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # buffers exist from the start

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch
        n = key_states.shape[-2]
        keys, values = b.buffers[self.index]
        keys[: b.rows, :, b.end : b.end + n] = key_states
        values[: b.rows, :, b.end : b.end + n] = value_states
        self._views(n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.batch.span

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.batch.span + query_length, 0


class BatchedKV:
    """The running requests' caches, one row each, in per-layer buffers
    [row capacity, kv_heads, column capacity, head_dim].

    Every row ends at column `end`; row i's real tokens are columns `end - lengths[i]` to `end`,
    and the batch's live span starts at `start = end - max(lengths)`. Columns of a row before its
    own start hold zeros or a departed row's values: finite (so masking them out is exact), never
    garbage. Buffers come from `torch.empty`, so room that is never used costs address space, not
    memory.

    Each step writes column `end` and moves it right. When it reaches the capacity, the live region
    is moved back to the left inside the same buffers: the capacity is kept at least
    `2 x span + RIGHT_ROOM` so the move never overlaps and lands in memory already in use (fresh
    pages cost far more to fault in than to copy into on a VM). New buffers are allocated only when
    the span or the row count outgrows them.

    The buffers are inference tensors (the forward writes into them under `inference_mode`), so
    every method that writes them runs under `inference_mode` too."""

    @torch.inference_mode()
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_rows: int = 0,
    ) -> None:
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.num_layers = num_layers
        self.max_rows = max_rows  # the caller's batch limit, if it has one: rows never outgrow it
        self.lengths: list[int] = []
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.capacity_rows = self.capacity_columns = 0
        self.start = self.end = 0
        self.reallocations = 0  # new buffers (tests, diagnostics)
        self.moves = 0  # live region moved back left in place
        self.cache = DynamicCache()
        self.cache.layers = [_BatchLayer(self, i) for i in range(num_layers)]

    @classmethod
    def like(cls, kv: SequenceKV, device: torch.device | None = None, max_rows: int = 0) -> BatchedKV:
        keys = kv.layers[0][0]
        return cls(
            len(kv.layers),
            int(keys.shape[0]),
            int(keys.shape[2]),
            keys.dtype,
            device or keys.device,
            max_rows,
        )

    # --- geometry --------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def span(self) -> int:
        """Columns of the live view: the longest row's length."""
        return self.end - self.start

    @property
    def pads(self) -> list[int]:
        return [self.span - n for n in self.lengths]

    def _views(self) -> None:
        for layer in self.cache.layers:
            layer._views()

    def _reallocate(self, rows: int, span: int) -> None:
        """New buffers for `rows` rows and a live span of `span`; the live region is copied to the
        left edge, with `span` spare columns before it for longer requests to join."""
        heads, dim = self.shape
        left = span
        columns = left + 2 * span + RIGHT_ROOM
        end = left + self.span
        fresh = []
        for layer in range(self.num_layers):
            pair = []
            for part in (0, 1):
                buf = torch.empty(rows, heads, columns, dim, dtype=self.dtype, device=self.device)
                if self.rows:
                    buf[: self.rows, :, end - self.span : end] = self.buffers[layer][part][
                        : self.rows, :, self.start : self.end
                    ]
                pair.append(buf)
            fresh.append((pair[0], pair[1]))
        self.buffers = fresh
        self.capacity_rows, self.capacity_columns = rows, columns
        self.start, self.end = end - self.span, end
        self.reallocations += 1
        self._views()

    def _move_left(self) -> None:
        """Move the live region to column `span` (it never overlaps its old place; see the class)."""
        span = self.span
        target = span
        assert target + span <= self.start, "live region would overlap its move"
        for keys, values in self.buffers:
            for buf in (keys, values):
                buf[: self.rows, :, target : target + span] = buf[: self.rows, :, self.start : self.end]
        self.start, self.end = target, target + span
        self.moves += 1
        self._views()

    @torch.inference_mode()
    def reserve(self, new_tokens: int = 1) -> None:
        """Room for `new_tokens` more columns on the right (call before a forward)."""
        if self.end + new_tokens <= self.capacity_columns:
            return
        if 2 * self.span + new_tokens <= self.start:
            self._move_left()
        else:
            self._reallocate(self.capacity_rows, self.span + new_tokens)

    def commit(self, new_tokens: int = 1) -> None:
        """After a forward wrote `new_tokens` per row: they become part of every row."""
        self.end += new_tokens
        self.lengths = [n + new_tokens for n in self.lengths]
        self._views()

    # --- membership ------------------------------------------------------------------------------

    def _zero(self, rows: slice, first: int, last: int) -> None:
        if last > first:
            for keys, values in self.buffers:
                keys[rows, :, first:last] = 0
                values[rows, :, first:last] = 0

    @torch.inference_mode()
    def add(self, kv: SequenceKV) -> int:
        """Copy one request's cache into a new last row; returns its row index."""
        n = kv.num_tokens
        if self.max_rows and self.rows >= self.max_rows:
            raise ValueError(f"the batch already holds its limit of {self.max_rows} rows")
        if self.rows == self.capacity_rows:
            # With a known limit, all rows at once: rows never used are never touched.
            rows = self.max_rows or max(MIN_ROWS, 2 * self.capacity_rows)
            self._reallocate(rows, max(self.span, n))
        elif n > self.end:
            self._reallocate(self.capacity_rows, max(self.span, n))
        row = self.rows
        if n > self.span:  # the live span widens to the left: those columns of the others are padding
            self._zero(slice(0, row), self.end - n, self.start)
            self.start = self.end - n
        self._zero(slice(row, row + 1), self.start, self.end - n)
        for layer, (k, v) in enumerate(kv.layers):
            keys, values = self.buffers[layer]
            keys[row, :, self.end - n : self.end] = k
            values[row, :, self.end - n : self.end] = v
        self.lengths.append(n)
        self._views()
        return row

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (one row's cache copied)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for keys, values in self.buffers:
                keys[row, :, self.end - n : self.end] = keys[last, :, self.end - n : self.end]
                values[row, :, self.end - n : self.end] = values[last, :, self.end - n : self.end]
            self.lengths[row] = n
        self.lengths.pop()
        self.start = self.end - max(self.lengths, default=0)
        self._views()

    def row(self, index: int) -> SequenceKV:
        """The unpadded cache of one row (views: copy before the batch changes)."""
        n = self.lengths[index]
        return SequenceKV(
            [
                (k[index, :, self.end - n : self.end], v[index, :, self.end - n : self.end])
                for k, v in self.buffers
            ]
        )

    def attention_mask(self, new_tokens: int = 1) -> torch.Tensor:
        """[rows, span + new_tokens]: 0 over each row's padding, 1 over its real tokens."""
        columns = torch.arange(self.span + new_tokens)
        pads = torch.tensor(self.pads, dtype=torch.long)
        return (columns.unsqueeze(0) >= pads.unsqueeze(1)).long()


def build_batch(sequences: list[SequenceKV], device: torch.device | None = None) -> BatchedKV:
    batch = BatchedKV.like(sequences[0], device)
    for seq in sequences:
        batch.add(seq)
    return batch
