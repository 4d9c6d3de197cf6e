"""Per-request KV caches and the batched, left-padded cache a decode step runs on.

A request's cache is a `SequenceKV`: per layer a (keys, values) pair shaped [kv_heads, tokens,
head_dim], unpadded. That is what prefill holds, what KV transfer moves, and what decode stores.

A decode step runs ONE forward over all running requests. Their lengths differ, so their caches
are left-padded to a common length inside a transformers `DynamicCache` ([batch, kv_heads, L,
head_dim]) and the padding is masked out with the attention mask; each row's position ids continue
from its own length. The batched cache is rebuilt only when membership changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

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


@dataclass
class BatchedKV:
    """Left-padded cache for the rows of a decode batch; row i has `pads[i]` masked columns first."""

    cache: DynamicCache
    pads: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def attention_mask(self, new_tokens: int = 1) -> torch.Tensor:
        """[batch, length + new_tokens]: 0 over each row's padding, 1 over its real tokens."""
        total = self.length + new_tokens
        mask = torch.ones(len(self.pads), total, dtype=torch.long)
        for row, pad in enumerate(self.pads):
            mask[row, :pad] = 0
        return mask

    def row(self, index: int) -> SequenceKV:
        """The unpadded cache of one row (views, not copies)."""
        pad = self.pads[index]
        return SequenceKV([(k[index, :, pad:], v[index, :, pad:]) for k, v in cache_to_layers(self.cache)])


def build_batch(sequences: list[SequenceKV]) -> BatchedKV:
    """Left-pad the sequences' caches to the longest one and stack them into one DynamicCache."""
    length = max(s.num_tokens for s in sequences)
    pads = [length - s.num_tokens for s in sequences]
    layers = []
    for layer in range(len(sequences[0].layers)):
        stacked = []
        for part in (0, 1):
            first = sequences[0].layers[layer][part]
            heads, _, dim = first.shape
            out = first.new_zeros(len(sequences), heads, length, dim)
            for row, seq in enumerate(sequences):
                out[row, :, pads[row] :] = seq.layers[layer][part]
            stacked.append(out)
        layers.append((stacked[0], stacked[1]))
    return BatchedKV(DynamicCache(ddp_cache_data=layers), pads)
