"""Run one rank of a tiny model's sharded forward (tests): `python -m distserve_worker.testing.sharded
ARCH TP RANK STORE_PORT OUT.npy`.

Each rank builds the same tiny model (same seed), keeps its shard (`tp/shard.py`), runs a prompt
through a prefill and a few greedy decode steps through the engine's own runner and batched KV
cache, and rank 0 writes what a user would compare: the logits of every step and the shapes it
held, as a plain .npy (no pickle).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from distserve_worker.engine.runner import ModelRunner
from distserve_worker.testing.tiny import tiny_model
from distserve_worker.tp.ranks import RankPlace, join
from distserve_worker.tp.shard import shard_model

PROMPTS = [[5, 17, 33, 2, 250, 9, 41], [7, 7, 200]]
STEPS = 4


def run(arch: str, tp: int, rank: int, store_port: int) -> tuple[np.ndarray, dict[str, int]]:
    torch.set_num_threads(1)
    model = tiny_model(arch)
    if tp > 1:
        join(RankPlace(rank, tp, store_port), store=_store(rank, tp, store_port))
        model = shard_model(model, tp, rank)
    runner = ModelRunner(model, 1)
    outs = runner.prefill(PROMPTS)
    logits = [torch.stack([o.last_logits for o in outs])]
    batch = runner.empty_batch(outs[0].kv)
    for o in outs:
        batch.add(o.kv)
    tokens = [int(o.last_logits.argmax()) for o in outs]
    for _ in range(STEPS):
        step = runner.decode_step(batch, tokens)
        logits.append(step)
        tokens = [int(row.argmax()) for row in step]
    facts = {"parameters": runner.parameters, "kv_heads": int(outs[0].kv.layers[0][0].shape[0])}
    return torch.stack(logits).numpy(), facts


def _store(rank: int, tp: int, port: int) -> torch.distributed.TCPStore:
    from distserve_worker.tp.ranks import JOIN_TIMEOUT

    return torch.distributed.TCPStore("127.0.0.1", port, tp, is_master=rank == 0, timeout=JOIN_TIMEOUT)


def main(argv: list[str]) -> int:
    arch, tp, rank, port, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    logits, facts = run(arch, tp, rank, port)
    np.save(out, logits, allow_pickle=False)
    np.save(out + ".facts.npy", np.array([facts["parameters"], facts["kv_heads"]]), allow_pickle=False)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    # Leave without running gloo's C++ destructors: at interpreter exit they can abort the process
    # ("terminate called without an active exception") after all the work is done and written.
    os._exit(code)
