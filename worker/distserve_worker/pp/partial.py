"""One pipeline stage of a causal LM: keep layers [start, end) of a loaded model, drop the rest.

The stage runs through the model's own forward (`transformers`), truncated in place:

- its decoder layers only, renumbered 0..n-1 (each layer's cache slot is its index), with the
  config's layer count and per-layer attention types cut to match, so the model's own loop, mask
  and cache see exactly these layers;
- stage 0 keeps the token embeddings; later stages take hidden states (`inputs_embeds`);
- the last stage keeps the final norm and the LM head; earlier stages end after their last layer
  (no norm: the next stage's layers take the raw residual stream) and hand on hidden states.

A tied LM head (SmolLM2) shares its weight with the embeddings, so the last stage keeps that one
tensor for the head. Supported: Llama-style models (`model.layers`, `model.norm`, `lm_head`), the
same families tensor parallelism shards; anything else is refused before loading (`check_model`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

from torch import nn

from distserve_worker.contract import model_shape, text_config
from distserve_worker.tp.shard import SHARDABLE_MODEL_TYPES

PIPELINE_MODEL_TYPES = SHARDABLE_MODEL_TYPES


class StageError(ValueError):
    """The model cannot be cut into this stage; the message says why."""


@dataclass(frozen=True)
class StageSpan:
    """Layers [start, end) of a model of `total` layers."""

    start: int
    end: int
    total: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.total

    @property
    def whole(self) -> bool:
        return self.first and self.last


def keep_stage(model: Any, start: int, end: int) -> Any:
    """Cut `model` (a loaded causal LM, on any device) down to layers [start, end), in place."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "norm"):
        raise StageError(
            f"pipeline stages support Llama-style models ({', '.join(PIPELINE_MODEL_TYPES)}); "
            f"{type(model).__name__} has no model.layers / model.norm"
        )
    total = len(layers)
    if not 0 <= start < end <= total:
        raise StageError(f"layers [{start}, {end}) are not inside the model's {total} layers")
    span = StageSpan(start, end, total)
    model.distserve_stage = span
    if span.whole:
        return model
    kept = nn.ModuleList(list(layers)[start:end])
    for index, layer in enumerate(kept):
        # The cache is indexed by the layer's own number: this stage's cache has only its layers.
        layer.self_attn.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    base.layers = kept
    config = text_config(model.config)
    config.num_hidden_layers = end - start
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[start:end]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is base.embed_tokens.weight
    if not span.last:
        base.norm = nn.Identity()
        model.lm_head = None
    if not span.first and not (span.last and tied):
        base.embed_tokens = None
    gc.collect()
    return model


def stage_span(model: Any) -> StageSpan:
    """The span `keep_stage` cut (the whole model when it was never cut)."""
    span = getattr(model, "distserve_stage", None)
    if span is not None:
        return span
    config = getattr(model, "config", None)  # any family (OPT and GPT-2 keep their layers elsewhere)
    total = model_shape(config)[0] if config is not None else 0  # 0: a wrapper that says nothing
    return StageSpan(0, total, total)


def load_stage(spec: Any, layers: tuple[int, int]) -> tuple[Any, Any]:
    """(this stage's part of the model on its device, tokenizer): loaded on the CPU, cut, then moved,
    so the device only ever holds the stage's own layers."""
    import torch

    from distserve_worker.model_source import load_model

    model, tokenizer = load_model(spec, device="cpu")
    model = keep_stage(model, *layers)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer
