"""Reading and checking the runtime contract (`plan.json`) before anything is loaded.

The worker obeys the contract (`distserve_operator.api.RuntimeContract`): its role's tp, its stage's
layer range, the engine limits and the ports. A contract that is malformed, or that does not fit
the model (a tp that does not divide its heads, a layer range outside it), stops the worker with
one line naming the field and the fix, and exit status 2, before any weights are read: a
CrashLoopBackOff whose log says what to change, not a stack trace after minutes of loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distserve_operator.api import Role, RuntimeContract, tp_refusal
from distserve_operator.api.errors import format_errors


class ContractError(ValueError):
    """The plan file cannot be obeyed; the message is one line: where, what, and the fix."""


def first_error(exc: ValidationError, model: type[RuntimeContract] = RuntimeContract) -> str:
    """The first problem, in the API's own words (field path and fix), and how many more there are."""
    lines = format_errors(exc, root="", model=model)
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return f"{lines[0]}{more}"


def load_contract(path: str | Path) -> RuntimeContract:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ContractError(
            f"plan file {path}: cannot read it ({exc.strerror}): mount the plan ConfigMap"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"plan file {path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ContractError(f"plan file {path}: expected a JSON object (the plan ConfigMap's plan.json)")
    try:
        return RuntimeContract.model_validate(data)
    except ValidationError as exc:
        raise ContractError(
            f"plan file {path}: {first_error(exc)}; re-render it with the operator or `distserve up` of this version"
        ) from exc


def check_role_stage(contract: RuntimeContract, role: str, stage: int, where: str = "plan file") -> None:
    """The worker's own role and stage exist in the contract."""
    if role not in (Role.PREFILL.value, Role.DECODE.value):
        raise ContractError(f"{where}: role {role!r} has no entry (prefill or decode)")
    phase = contract.phase(role)
    if not 0 <= stage < phase.pp:
        raise ContractError(
            f"{where}: --stage {stage} (DISTSERVE_STAGE) is outside {role}.pp {phase.pp}: "
            f"use a stage from 0 to {phase.pp - 1}"
        )


def check_colocated(contract: RuntimeContract, stage: int, where: str = "plan file") -> None:
    """The contract's colocated entry is one this worker runs: one process on one device (TP1,
    one stage; colocated.py)."""
    phase = contract.phase(Role.COLOCATED)
    if phase.tp != 1 or phase.pp != 1:
        raise ContractError(
            f"{where}: colocated is TP{phase.tp}xPP{phase.pp} but the colocated worker runs TP1xPP1 only "
            "(one process, one device): re-plan it with this version's operator or `distserve up`, which "
            "deploy only that shape, or set spec.serving.mode to Disaggregated"
        )
    if stage != 0:
        raise ContractError(f"{where}: --stage {stage} (DISTSERVE_STAGE): colocated.pp is 1, use stage 0")


def text_config(config: Any) -> Any:
    """The language model's part of a transformers config (the config itself for text-only models)."""
    return getattr(config, "get_text_config", lambda: config)()


def model_shape(config: Any) -> tuple[int, int, int]:
    """(layers, attention heads, key/value heads) from a transformers config of any family."""
    text = text_config(config)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not (layers and heads and kv_heads):
        raise ContractError(
            "the model's config names no layer or head counts: it cannot be planned or sharded"
        )
    return int(layers), int(heads), int(kv_heads)


def check_against_model(contract: RuntimeContract, role: str, stage: int, config: Any) -> None:
    """The contract fits the model that will be loaded: layer range inside it, tp dividing its heads."""
    layers, heads, kv_heads = model_shape(config)
    phase = contract.phase(role)
    if phase.num_layers != layers:
        raise ContractError(
            f"plan file: {role}.stages cover {phase.num_layers} layers but the model has {layers}: set "
            "spec.model.architecture.layers to the model's num_hidden_layers"
        )
    span = phase.stages[stage].layers
    if span.end > layers:
        raise ContractError(
            f"plan file: {role}.stages[{stage}].layers [{span.start}, {span.end}) is outside the model's "
            f"{layers} layers"
        )
    reason = tp_refusal(heads, kv_heads, phase.tp)
    if reason:
        raise ContractError(f"plan file: {role}.tp: {reason}")
