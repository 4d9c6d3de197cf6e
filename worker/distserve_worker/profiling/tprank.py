"""One rank of a TP-t profile: `python -m distserve_worker.profiling.tprank CONFIG`.

Started by `profiling/tpmeasure.py`, never by hand. Every rank does what a tensor-parallel worker's
rank does at start (`tp/ranks.py`: join the process group, NCCL on GPUs and gloo on the CPU, load
the model and keep this rank's shard), then runs the same sweep as TP1 (`measure.py`) on its
`ModelRunner`. The sweep is deterministic in its seed, so every rank runs the same forwards in the
same order and their collectives line up, as the worker's ranks do in rank 0's order. Rank 0's
timings are the instance's: it answers the request, and its forward ends only when the slowest
rank's collectives do. Rank 0 writes its points (the `--samples` format) to the config's "out".

Not timed: rank 0's gRPC fan-out of each forward to its followers (`tp/group.py`), which a worker
starts before its own forward (`engine/decoder.py`, `prefill.py`) so that the two overlap.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RankConfig:
    rank: int
    world: int
    store_port: int
    sweep: dict[str, Any]  # measure.Sweep's fields
    seed: int
    threads: int
    dtype: str
    random_llama: str | None  # a random-weight shape, else `model`
    model: dict[str, str] | None  # model_source.ModelSpec's fields
    out: str  # rank 0's points go here
    progress: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _load(config: RankConfig, place: Any) -> Any:
    """This rank's shard on its device, loaded as the workers' ranks load theirs."""
    from distserve_worker.model_source import ModelSpec
    from distserve_worker.tp.ranks import load_shard

    if config.random_llama is None:
        assert config.model is not None
        return load_shard(ModelSpec(**config.model), place)[0]
    from distserve_worker.profiling.randommodel import random_llama
    from distserve_worker.tp.shard import shard_model

    # The weights are random: each rank builds the full model on the CPU from the same seed and
    # keeps its shard, as load_shard does with a checkpoint.
    model = random_llama(config.random_llama, config.dtype, "cpu", config.seed)
    return shard_model(model, place.world, place.rank).to(place.device).eval()


def run(config: RankConfig) -> None:
    import torch

    from distserve_worker.engine.runner import ModelRunner
    from distserve_worker.kvtransfer.memory import keep_freed_memory
    from distserve_worker.profiling import measure
    from distserve_worker.tp.ranks import RankPlace, join

    keep_freed_memory(measure.CHUNK_BYTES)  # before any tensor, as the workers' ranks do
    torch.set_num_threads(max(1, config.threads))
    place = RankPlace(config.rank, config.world, config.store_port)
    join(place)
    runner = ModelRunner(_load(config, place))
    s = config.sweep
    sweep = measure.Sweep(
        tuple(tuple(b) for b in s["prefill_batches"]),
        tuple(s["decode_batches"]),
        tuple(s["decode_contexts"]),
        s["repetitions"],
    )
    say = config.progress and config.rank == 0  # one voice: the followers' points are not timed
    tag = f"TP{config.world} ({config.world} ranks on {place.device.type}, {place.backend})"
    prefill, decode = measure.measure_both(runner, sweep, config.seed, tag, say)
    if config.rank == 0:
        with open(config.out, "w") as f:
            json.dump(
                {
                    "prefill": [{"lengths": list(p.lengths), "ms": p.ms} for p in prefill],
                    "decode": [{"batch": p.batch, "ctxTokens": p.ctx_tokens, "ms": p.ms} for p in decode],
                },
                f,
            )


def main(argv: list[str] | None = None) -> int:
    config = RankConfig(**json.loads((argv or sys.argv[1:])[0]))
    os.dup2(2, 1)  # the loaders' progress lines are not `distserve profile`'s stdout
    run(config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the process group's C++ destructors (they can abort at interpreter exit)


if __name__ == "__main__":
    raise SystemExit(main())
