"""Tensor parallelism inside one instance: shard a loaded causal LM over `tp` ranks, in place.

The Megatron layout, written here rather than taken from transformers' `tp_plan="auto"`:

- attention: q/k/v projections split by heads (column-parallel, biases too), so rank r computes
  heads [r*H/t, (r+1)*H/t) and its KV cache holds only those heads; o_proj split by its input
  (row-parallel) and the partial outputs summed with one all-reduce;
- MLP: gate/up column-parallel, down row-parallel + one all-reduce;
- embeddings and the LM head split by vocabulary rows (tied weights stay tied: one shard); the
  embedding's partial lookups are summed, the LM head's logits all-gathered, so every rank ends
  with the full logits and runs the same sampling-free forward.

Why our own rather than transformers' `tp_plan="auto"` (which works here too: same greedy tokens):
the head ranges are ours to fix, and the KV resharding between prefill and decode TPs relies on
them (`tp/heads.py`); parameters stay plain tensors, where transformers' plan keeps DTensors whose
per-op dispatch cost a 2-layer Llama's TP2 decode step 14.1 ms against 11.7 ms here on this CPU
(both dominated by gloo's ~1 ms per collective on loopback; TP1: 0.9-1.7 ms); and the loading path
stays the workers' own (GGUF and every model source).

Supported: decoder layers with `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` (Llama,
SmolLM2, Mistral, Qwen2 and their relatives). Anything else is refused with the reason.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distserve_worker.contract import text_config
from distserve_worker.tp.heads import rank_heads

# transformers `model_type`s whose decoder layers shard here (tested: tests/unit/test_worker_tp_shard.py).
SHARDABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class ShardError(ValueError):
    """The model cannot be split over these ranks; the message says why."""


def _rows(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return weight.detach()[start:end].clone()


class RowParallelLinear(nn.Module):
    """y = x_r W_r^T summed over ranks (+ bias once, after the sum)."""

    def __init__(self, full: nn.Linear, start: int, end: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[:, start:end].clone(), requires_grad=False)
        self.bias = (
            None if full.bias is None else nn.Parameter(full.bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def _column(full: nn.Linear, start: int, end: int) -> nn.Linear:
    out = nn.Linear(
        full.in_features,
        end - start,
        bias=full.bias is not None,
        device=full.weight.device,
        dtype=full.weight.dtype,
    )
    out.weight = nn.Parameter(_rows(full.weight, start, end), requires_grad=False)
    if full.bias is not None:
        out.bias = nn.Parameter(_rows(full.bias, start, end), requires_grad=False)
    return out


def vocab_range(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    """Rows of the embedding / LM head on `rank`: equal blocks of ceil(vocab/tp), the last one short."""
    block = -(-vocab // tp)
    return min(vocab, rank * block), min(vocab, (rank + 1) * block)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding; ids outside give zeros, the all-reduce fills them in."""

    def __init__(self, weight: nn.Parameter, start: int, end: int) -> None:
        super().__init__()
        self.weight = weight
        self.start, self.end = start, end

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(out)
        return out


class VocabParallelLMHead(nn.Module):
    """Logits for rows [start, end) of the vocabulary, all-gathered to the full vocabulary."""

    def __init__(self, weight: nn.Parameter, vocab: int, tp: int) -> None:
        super().__init__()
        self.weight = weight
        self.vocab, self.tp = vocab, tp
        self.block = -(-vocab // tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)
        short = self.block - local.shape[-1]
        if short:  # the last rank's block is shorter; all_gather needs equal shapes
            local = F.pad(local, (0, short))
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def check_shardable(model: nn.Module, tp: int) -> None:
    """ShardError naming what is not supported or what does not divide."""
    for i, layer in enumerate(_decoder_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [n for n in ATTENTION if not isinstance(getattr(attn, n, None), nn.Linear)]
        missing += [n for n in MLP if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise ShardError(
                f"tensor parallelism supports Llama-style decoder layers (Llama, Mistral, Qwen2); "
                f"layer {i} of {type(model).__name__} has no {', '.join(missing)}"
            )
    config = text_config(model.config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for what, count in (
        ("attention heads", heads),
        ("key/value heads", kv_heads),
        ("MLP width (intermediate_size)", config.intermediate_size),
    ):
        if count % tp:
            raise ShardError(f"TP{tp} does not divide the model's {count} {what}")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ShardError(
            "tensor parallelism supports Llama-style decoder layers (Llama, Mistral, Qwen2); "
            f"{type(model).__name__} has no model.layers"
        )
    return layers


@torch.no_grad()
def shard_model(model: nn.Module, tp: int, rank: int) -> nn.Module:
    """Keep only rank `rank`'s shard of every weight (the rest is freed); needs the default
    process group of the instance's `tp` ranks for the forward."""
    if tp == 1:
        return model
    check_shardable(model, tp)
    config = text_config(model.config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q0, q1 = rank_heads(heads, tp, rank)
    k0, k1 = rank_heads(kv_heads, tp, rank)
    per_mlp = config.intermediate_size // tp
    m0, m1 = rank * per_mlp, (rank + 1) * per_mlp
    for layer in _decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _column(attn.q_proj, q0 * head_dim, q1 * head_dim)
        attn.k_proj = _column(attn.k_proj, k0 * head_dim, k1 * head_dim)
        attn.v_proj = _column(attn.v_proj, k0 * head_dim, k1 * head_dim)
        attn.o_proj = RowParallelLinear(attn.o_proj, q0 * head_dim, q1 * head_dim)
        mlp.gate_proj = _column(mlp.gate_proj, m0, m1)
        mlp.up_proj = _column(mlp.up_proj, m0, m1)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, m0, m1)
    # A pipeline stage (pp/partial.py) may hold neither: the embeddings live on stage 0, the head
    # on the last stage (which keeps a tied embedding only as the head's weight).
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embed is None and head is None:
        return model
    vocab = (embed if embed is not None else head).weight.shape[0]
    v0, v1 = vocab_range(vocab, tp, rank)
    tied = head is not None and embed is not None and head.weight is embed.weight
    embed_shard = None
    if embed is not None:
        embed_shard = nn.Parameter(_rows(embed.weight, v0, v1), requires_grad=False)
        model.set_input_embeddings(VocabParallelEmbedding(embed_shard, v0, v1))
    if head is not None:
        if getattr(head, "bias", None) is not None:
            raise ShardError("an LM head with a bias is not supported under tensor parallelism")
        head_shard = (
            embed_shard
            if tied and embed_shard is not None
            else nn.Parameter(_rows(head.weight, v0, v1), requires_grad=False)
        )
        model.set_output_embeddings(VocabParallelLMHead(head_shard, head.weight.shape[0], tp))
    return model
