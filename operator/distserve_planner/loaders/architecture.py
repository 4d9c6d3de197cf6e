"""A model spec's architecture, from what its files say: the spec's `model.architecture`, GGUF
metadata (Embedded or a GGUF path), a `config.json` at a Path source, then the built-in catalogue."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from distserve_operator import api

from ..architecture import CATALOGUE, ModelArchitecture, catalogue_key, from_hf_config, from_spec
from .gguf import embedded_gguf_path, from_gguf


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
