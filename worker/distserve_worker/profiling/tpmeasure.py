"""Timing the forwards at tensor parallelism t > 1: t rank processes (`profiling/tprank.py`), one
device each (cuda:0..t-1, or t CPU processes over gloo), sharded and joined by the runtime's own TP
code (`tp/`), each running the TP1 sweep; rank 0's points come back here to be fitted like TP1's.

`refusal` says, before any process starts, why a TP size cannot run (the model does not split over
it, or there are fewer devices than ranks): `distserve profile` skips that size and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from distserve_worker.profiling.fit import DecodePoint, PrefillPoint
from distserve_worker.profiling.measure import Sweep
from distserve_worker.profiling.tprank import RankConfig


class RankFailed(RuntimeError):
    """A rank exited before the sweep was done; the message names it."""


def refusal(config: Any, tp: int, device_type: str, cuda_devices: int) -> str:
    """Why `tp` ranks cannot run this model (a transformers config) here, or "" when they can."""
    from distserve_operator.api import tp_refusal
    from distserve_worker.contract import model_shape, text_config
    from distserve_worker.tp.shard import SHARDABLE_MODEL_TYPES

    model_type = getattr(config, "model_type", "")
    if model_type not in SHARDABLE_MODEL_TYPES:
        return (
            f"tensor parallelism supports {', '.join(SHARDABLE_MODEL_TYPES)} models, this one is "
            f"{model_type!r}: profile it with --tp 1"
        )
    _, heads, kv_heads = model_shape(config)
    reason = tp_refusal(heads, kv_heads, tp)
    if reason:
        return reason
    width = getattr(text_config(config), "intermediate_size", 0)
    if width % tp:
        return f"TP{tp} does not divide the model's MLP width ({width}): use a TP that divides it"
    if device_type == "cuda" and cuda_devices < tp:
        return f"TP{tp} needs {tp} CUDA devices (one per rank), this machine has {cuda_devices}"
    return ""


def measure(
    tp: int,
    sweep: Sweep,
    *,
    device_type: str,
    dtype: str,
    threads: int,
    seed: int,
    random_llama: str | None,
    model: dict[str, str] | None,
    progress: bool,
) -> tuple[list[PrefillPoint], list[DecodePoint]]:
    """Rank 0's timed points of the sweep at TP `tp`. Raises RankFailed when a rank fails."""
    from distserve_worker.tp.ranks import host_store

    # The ranks rendezvous through a store held here (in a worker, rank 0 holds it), so every rank,
    # rank 0 included, is a fresh process that this one only waits for.
    store = host_store(tp)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if device_type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # RankPlace puts ranks on CUDA whenever torch sees a GPU
    with tempfile.TemporaryDirectory(prefix="distserve-profile-") as tmp:
        out = Path(tmp) / "rank0.json"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distserve_worker.profiling.tprank",
                    RankConfig(
                        rank=rank,
                        world=tp,
                        store_port=store.port,
                        sweep=dataclasses.asdict(sweep),
                        seed=seed,
                        threads=threads,
                        dtype=dtype,
                        random_llama=random_llama,
                        model=model,
                        out=str(out),
                        progress=progress,
                    ).to_json(),
                ],
                stdin=subprocess.DEVNULL,
                env=env,
            )
            for rank in range(tp)
        ]
        try:
            failed = _wait(procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if failed:
            raise RankFailed(f"TP{tp}: {failed}; see its output above")
        raw = json.loads(out.read_text())
    del store
    return (
        [PrefillPoint(tuple(p["lengths"]), p["ms"]) for p in raw["prefill"]],
        [DecodePoint(p["batch"], p["ctxTokens"], p["ms"]) for p in raw["decode"]],
    )


def _wait(procs: list[subprocess.Popen[bytes]]) -> str:
    """Until every rank exits; the first that fails ends the wait (its peers would otherwise wait
    for it until their collective or join timeout), with which rank and how."""
    while True:
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code:
                how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return f"rank {rank} {how}"
        running = [p for p in procs if p.poll() is None]
        if not running:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            running[0].wait(timeout=0.5)
