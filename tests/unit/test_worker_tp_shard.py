"""Tensor-parallel sharding (tp/shard.py) on tiny Llama, Qwen2 and Mistral: real processes, one per
rank, gloo collectives on the CPU. The sharded engine's logits equal the one-process model's, each
rank holds only its shard of the weights and of the KV heads, and what cannot shard is refused."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from distserve_worker.local.stack import free_port
from distserve_worker.testing import sharded
from distserve_worker.testing.tiny import TP_ARCHITECTURES, tiny_model
from distserve_worker.tp.shard import ShardError, check_shardable, vocab_range

# Row-parallel layers sum partial products in another order than one matrix product: float32
# logits agree to ~1e-6 relative, not bit for bit.
ATOL = 1e-4


def _ranks(arch: str, tp: int, tmp_path) -> list[tuple[np.ndarray, np.ndarray]]:
    port = free_port()
    outs = [tmp_path / f"{arch}-{tp}-{r}.npy" for r in range(tp)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distserve_worker.testing.sharded",
                arch,
                str(tp),
                str(r),
                str(port),
                str(outs[r]),
            ]
        )
        for r in range(tp)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    return [
        (np.load(o, allow_pickle=False), np.load(str(o) + ".facts.npy", allow_pickle=False)) for o in outs
    ]


@pytest.mark.parametrize("arch", TP_ARCHITECTURES)
def test_tp2_logits_match_one_process_and_each_rank_holds_half(arch, tmp_path):
    threads = torch.get_num_threads()
    try:  # the one-process reference, here
        full, facts = sharded.run(arch, 1, 0, 0)
    finally:
        torch.set_num_threads(threads)
    full_facts = np.array([facts["parameters"], facts["kv_heads"]])
    shards = _ranks(arch, 2, tmp_path)
    for logits, _ in shards:
        np.testing.assert_allclose(logits, full, atol=ATOL, rtol=0)
        # Same greedy choices at every step: what a user sees.
        assert (logits.argmax(-1) == full.argmax(-1)).all()
    total = tiny_model(arch).num_parameters()
    for _, facts in shards:
        params, kv_heads = int(facts[0]), int(facts[1])
        assert kv_heads == int(full_facts[1]) // 2  # each rank caches only its own key/value heads
        # Its shard: about half the weights (norms are replicated, so a little more than half).
        assert total * 0.45 < params < total * 0.6
    assert int(full_facts[0]) == total


def test_models_that_cannot_shard_are_refused_with_the_reason():
    with pytest.raises(ShardError, match="TP3 does not divide the model's 4 attention heads"):
        check_shardable(tiny_model("llama"), 3)
    with pytest.raises(ShardError, match="Llama-style decoder layers"):
        check_shardable(tiny_model("opt"), 2)


def test_vocab_rows_cover_the_vocabulary_once_even_when_tp_does_not_divide_it():
    for vocab, tp in ((257, 2), (49152, 3), (10, 4)):
        ranges = [vocab_range(vocab, tp, r) for r in range(tp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
