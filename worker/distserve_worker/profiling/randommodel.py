"""Random-weight Llama models at named sizes: profiling needs the shape and the dtype, not the
weights, so a GPU profile of an 8B-class model needs no download (weights are built on the device)."""

from __future__ import annotations

from typing import Any

# Llama-architecture shapes (hidden, intermediate, layers, heads, kv heads, vocab).
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 2, 257),
    # SmolLM2-135M's size with heads that split in two (SmolLM2 has 9 and 3): the CPU TP benchmark.
    "smol-h8": (576, 1536, 30, 8, 4, 49152),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256),
}
MODEL_NAMES = {
    "tiny": "random-llama-tiny",
    "smol-h8": "random-llama-135m-8-heads",
    "llama-1b": "meta-llama/Llama-3.2-1B",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
}


def random_config(size: str) -> Any:
    """The transformers config of the named shape (what TP sizes are checked against, no weights)."""
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[size]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def random_llama(size: str, dtype: str, device: str, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    config = random_config(size)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: no fp32 copy of 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
