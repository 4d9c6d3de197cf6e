"""Runtime contracts for tests and benchmarks: a model and each role's tp, pp (and layer split),
written where a `LocalStack` reads them (`StackConfig(plan_file=...)`)."""

from __future__ import annotations

from pathlib import Path

from distserve_worker.model_source import ModelSpec


def write_contract(
    directory: Path,
    model: ModelSpec,
    layers: int,
    heads: int,
    kv_heads: int,
    prefill: tuple[int, int] = (1, 1),
    decode: tuple[int, int] = (1, 1),
    prefill_split: list[int] | None = None,
    decode_split: list[int] | None = None,
    replicas: tuple[int, int] = (1, 1),
    decode_max_batch: int = 32,
    limits: object | None = None,
) -> Path:
    """A contract running prefill as TP x PP `prefill` and decode as `decode` (splits: layers per
    stage, even without; `limits`: an `api.EngineLimits`, else the defaults with
    `decode_max_batch`); returns the plan file's path."""
    from distserve_operator import api
    from distserve_worker.local.stack import write_plan

    def phase(role: str, tp: int, pp: int, count: int, split: list[int] | None) -> api.PhaseContract:
        return api.phase_contract(role, tp, pp, count, layers, 50051, 8081, stage_layers=split)

    contract = api.RuntimeContract(
        model=api.ModelSpec.model_validate(
            {
                "name": model.name,
                "source": {"kind": model.kind} | ({"path": model.path} if model.path else {}),
                "dtype": model.dtype,
            }
        ),
        slo=api.Slo.model_validate({"ttftMillis": 10000, "tpotMillis": 10000}),
        shape=api.ModelShape(layers=layers, heads=heads, kv_heads=kv_heads),
        prefill=phase("prefill", *prefill, replicas[0], prefill_split),
        decode=phase("decode", *decode, replicas[1], decode_split),
        limits=limits or api.EngineLimits(decode_max_batch=decode_max_batch),
    )
    return write_plan(contract, directory)
