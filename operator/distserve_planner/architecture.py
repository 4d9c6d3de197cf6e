"""The transformer's shape and what the planner derives from it: parameters, weight bytes, FLOPs, KV bytes.

Pure: from the spec's `model.architecture`, a `config.json`'s fields or the built-in catalogue.
Reading a model's files (GGUF metadata, config.json) is `loaders.architecture.resolve`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from distserve_operator import api


@dataclass(frozen=True)
class ModelArchitecture:
    name: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True
    tied_embeddings: bool = False
    max_position_embeddings: int | None = None
    dtype_bytes: int = 2
    source: str = "spec"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (biases and norms are noise at this scale)."""
        h, kv = self.hidden_size, self.kv_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2  # q, o and k, v projections
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attention + mlp

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer: 2 * layers * kvHeads * headDim * dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through every layer, excluding attention over the context."""
        return 2 * self.layers * self.layer_params

    @property
    def lm_head_flops(self) -> int:
        """Only the last token of a prompt goes through the LM head."""
        return 2 * self.vocab_size * self.hidden_size

    def attention_flops(self, sum_sq_lengths: float) -> float:
        """QK^T and AV over a causal prompt: 2 matmuls * 2 FLOPs * len^2/2 * hidden per layer."""
        return 2.0 * self.layers * self.hidden_size * sum_sq_lengths

    def with_dtype(self, dtype_bytes: int) -> ModelArchitecture:
        return replace(self, dtype_bytes=dtype_bytes)


# Facts from each model's config.json. Keys are normalised names (lower case, no organisation).
CATALOGUE: dict[str, ModelArchitecture] = {
    "opt-13b": ModelArchitecture("facebook/opt-13b", 40, 5120, 40, 40, 20480, 50272, False, True, 2048),
    "opt-66b": ModelArchitecture("facebook/opt-66b", 64, 9216, 72, 72, 36864, 50272, False, True, 2048),
    "llama-3-8b": ModelArchitecture(
        "meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, True, False, 8192
    ),
    "smollm2-135m": ModelArchitecture(
        "HuggingFaceTB/SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, True, True, 8192
    ),
}
_ALIASES = {"meta-llama-3-8b": "llama-3-8b", "llama3-8b": "llama-3-8b"}


def catalogue_key(model_name: str) -> str | None:
    """`facebook/opt-13b` -> `opt-13b`; `Meta-Llama-3-8B-Instruct` -> `llama-3-8b`."""
    name = model_name.lower().rsplit("/", 1)[-1]
    for suffix in ("-instruct", "-chat", "-hf", "-base"):
        name = name.removesuffix(suffix)
    name = _ALIASES.get(name, name)
    return name if name in CATALOGUE else None


def from_spec(arch: api.Architecture, name: str) -> ModelArchitecture:
    return ModelArchitecture(
        name=name,
        layers=arch.layers,
        hidden_size=arch.hidden_size,
        heads=arch.heads,
        kv_heads=arch.kv_heads or arch.heads,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
        gated_mlp=arch.gated_mlp,
        max_position_embeddings=arch.max_position_embeddings,
        source="spec.model.architecture",
    )


def from_hf_config(config: dict[str, Any], name: str) -> ModelArchitecture:
    """Read a HuggingFace config.json (Llama/Mistral/Qwen names, OPT's ffn_dim, GPT-2's n_*)."""

    def pick(*keys: str) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        raise ValueError(f"config.json has none of {', '.join(keys)}: give spec.model.architecture instead")

    hidden = int(pick("hidden_size", "n_embd", "d_model"))
    heads = int(pick("num_attention_heads", "n_head"))
    model_type = str(config.get("model_type", ""))
    intermediate = (
        config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner") or 4 * hidden
    )
    return ModelArchitecture(
        name=name,
        layers=int(pick("num_hidden_layers", "n_layer")),
        hidden_size=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate_size=int(intermediate),
        vocab_size=int(pick("vocab_size")),
        gated_mlp=model_type not in ("opt", "gpt2", "gpt_neox", "gptj", "falcon"),
        tied_embeddings=bool(config.get("tie_word_embeddings", model_type in ("opt", "gpt2"))),
        max_position_embeddings=config.get("max_position_embeddings") or config.get("n_positions"),
        source="config.json",
    )
