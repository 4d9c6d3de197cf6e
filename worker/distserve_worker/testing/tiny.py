"""Tiny random-weight causal LMs (Llama, OPT, GPT-2 architectures) with a byte-level tokenizer.

Built from a config in code and saved with `save_pretrained`, so workers load them like any local
model (`source.kind: Path`). Hidden size 64, 2 layers: a forward takes about a millisecond.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "opt", "gpt2")
# The families tensor parallelism shards (tp/shard.py): Llama-style layers, Qwen2 with q/k/v biases.
# Their heads (4) and key/value heads (2) divide by 2.
TP_ARCHITECTURES = ("llama", "qwen2", "mistral")
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_tokenizer() -> Any:
    """257 tokens: EOS (id 0) and the 256 bytes, so any text round-trips and every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS: 0} | {ch: i + 1 for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE
    )


def tiny_model(
    arch: str, vocab_size: int = 257, seed: int = 0, max_positions: int = 512, layers: int = 2
) -> Any:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    llama_shape = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
    }
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama_shape, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**llama_shape, **common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**llama_shape, sliding_window=None, **common))
    elif arch == "opt":
        config = OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=max_positions,
            **common,
        )
        model = OPTForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown architecture {arch!r} (one of {ARCHITECTURES + TP_ARCHITECTURES[1:]})")
    return model.eval()


def save_tiny_model(
    arch: str, directory: Path, seed: int = 0, max_positions: int = 512, layers: int = 2
) -> Path:
    """Write a tiny model and its tokenizer to `directory` (a `source.kind: Path` model)."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, seed=seed, max_positions=max_positions, layers=layers).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def tiny_prompts(seed: int = 1) -> list[list[int]]:
    """Eight prompts of 3 to 89 random byte tokens (ids 1-256): short, long and between, within
    the tiny models' context, in one padded batch or alone."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1, 257) for _ in range(n)] for n in (3, 5, 8, 13, 21, 34, 55, 89)]


def greedy_body(model: str, prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A /v1/completions request for the greedy token ids of `prompt`."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    } | extra
