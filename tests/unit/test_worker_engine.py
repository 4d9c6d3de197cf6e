"""The engine on tiny random-weight models: batched forwards give the single-sequence tokens."""

import random

import pytest
import torch

from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.runner import ModelRunner, probe_kv_layout, reference_greedy
from distserve_worker.engine.sampling import SamplingParams, sample
from distserve_worker.testing.tiny import ARCHITECTURES, byte_tokenizer, tiny_model


def prompts(n=8, vocab=257, seed=1):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for length in (3, 5, 8, 13, 21, 34, 40, 55)[:n]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_prefill_and_decode_match_the_reference_loop(arch):
    model = tiny_model(arch)
    runner = ModelRunner(model)
    ps = prompts()
    steps = 10
    reference = [reference_greedy(model, p, steps, eos=set()) for p in ps]
    outs = runner.prefill(ps)
    tokens = [[int(o.last_logits.argmax())] for o in outs]
    lengths = [len(p) for p in ps]
    batch = runner.batch([o.kv for o in outs])
    for _ in range(steps - 1):
        logits = runner.decode_step(batch, [t[-1] for t in tokens], lengths)
        assert logits.shape[0] == len(ps)  # one forward for the whole batch
        for i, row in enumerate(logits):
            tokens[i].append(int(row.argmax()))
            lengths[i] += 1
    assert tokens == reference


def test_rebuilding_the_batch_carries_caches_over():
    model = tiny_model("llama")
    runner = ModelRunner(model)
    ps = prompts(3)
    reference = [reference_greedy(model, p, 12, eos=set()) for p in ps]
    outs = runner.prefill(ps)
    tokens = [[int(o.last_logits.argmax())] for o in outs]
    lengths = [len(p) for p in ps]

    def step(batch, rows):
        logits = runner.decode_step(batch, [tokens[r][-1] for r in rows], [lengths[r] for r in rows])
        for i, r in enumerate(rows):
            tokens[r].append(int(logits[i].argmax()))
            lengths[r] += 1

    # Row 0 runs alone for two steps, then rows 1 and 2 join, then row 1 leaves.
    batch = runner.batch([outs[0].kv])
    for _ in range(2):
        step(batch, [0])
    batch = runner.batch([batch.row(0), outs[1].kv, outs[2].kv])
    for _ in range(3):
        step(batch, [0, 1, 2])
    batch = runner.batch([batch.row(0), batch.row(2)])
    for _ in range(3):
        step(batch, [0, 2])
    assert [len(t) for t in tokens] == [9, 4, 7]
    assert all(t == ref[: len(t)] for t, ref in zip(tokens, reference, strict=True))


def test_kv_layout_is_read_from_the_model():
    layout = probe_kv_layout(ModelRunner(tiny_model("llama")))
    assert (layout.num_layers, layout.kv_heads, layout.head_dim, layout.dtype) == (2, 2, 16, torch.float32)
    assert layout.bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_seeded_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    draws = [sample(logits, params, index=i) for i in range(50)]
    assert draws == [sample(logits, params, index=i) for i in range(50)]
    assert set(draws) <= {0, 1} and len(set(draws)) == 2
    assert sample(logits, SamplingParams(), index=0) == 0


def test_detokenizer_holds_back_possible_stop_strings_and_cuts_at_them():
    tok = byte_tokenizer()
    d = Detokenizer(tok, stop=["END"])
    out = "".join(d.add(t) for t in tok("hello EN")["input_ids"])
    assert out == "hello "  # "EN" might start "END"
    out += "".join(d.add(t) for t in tok("D and more")["input_ids"])
    assert d.stopped and out == "hello "


def test_detokenizer_releases_held_text_that_is_not_a_stop():
    tok = byte_tokenizer()
    d = Detokenizer(tok, stop=["END"])
    text = "".join(d.add(t) for t in tok("an ENd é")["input_ids"]) + d.flush()
    assert text == "an ENd é" and not d.stopped
