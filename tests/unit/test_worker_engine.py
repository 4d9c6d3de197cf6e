"""The engine on tiny random-weight models: batched forwards give the single-sequence tokens."""

import random

import pytest
import torch

from distserve_worker.engine import kvcache
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
    batch = runner.batch([o.kv for o in outs])
    for _ in range(steps - 1):
        logits = runner.decode_step(batch, [t[-1] for t in tokens])
        assert logits.shape[0] == len(ps)  # one forward for the whole batch
        for i, row in enumerate(logits):
            tokens[i].append(int(row.argmax()))
    assert tokens == reference
    assert batch.lengths == [len(p) + steps - 1 for p in ps]


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no `logits_to_keep` (older or custom models)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache
        )


def test_prefill_logits_are_each_prompt_s_last_position_with_or_without_logits_to_keep():
    model = tiny_model("llama")
    ps = prompts(5)  # five lengths in one padded batch
    expected = [model(input_ids=torch.tensor([p])).logits[0, -1] for p in ps]
    kept, full = ModelRunner(model), ModelRunner(_NoLogitsToKeep(model))
    assert kept.keeps_logits and not full.keeps_logits
    for runner in (kept, full):
        for out, want in zip(runner.prefill(ps), expected, strict=True):
            assert out.last_logits.shape == want.shape
            assert torch.allclose(out.last_logits, want, atol=1e-5)


def _prefilled(arch, ps, max_tokens):
    """(runner, reference tokens, prefill outputs, tokens so far: the first) for prompts `ps`."""
    model = tiny_model(arch)
    runner = ModelRunner(model)
    reference = [reference_greedy(model, p, max_tokens, eos=set()) for p in ps]
    outs = runner.prefill(ps)
    return runner, reference, outs, [[int(o.last_logits.argmax())] for o in outs]


def test_requests_join_and_leave_a_running_batch_without_changing_anyone_s_tokens(monkeypatch):
    # Little spare room, so the run below also moves the live region and reallocates.
    monkeypatch.setattr(kvcache, "RIGHT_ROOM", 8)
    ps = prompts(5)
    runner, reference, outs, tokens = _prefilled("llama", ps, 80)
    batch = runner.empty_batch(outs[0].kv)
    rows: list[int] = []  # which request each batch row is

    def join(r):
        batch.add(outs[r].kv)
        rows.append(r)

    def leave(r):
        i = rows.index(r)
        batch.remove(i)
        last = rows.pop()
        if i < len(rows):
            rows[i] = last  # the last row moved into the gap

    def step(n=1):
        for _ in range(n):
            logits = runner.decode_step(batch, [tokens[r][-1] for r in rows])
            for i, r in enumerate(rows):
                tokens[r].append(int(logits[i].argmax()))

    join(0)
    step(2)
    join(4)  # longer than everyone running: the live span widens to the left
    join(1)
    step(3)
    leave(0)  # not the last row: the last one moves into its place
    join(2)
    step(70)  # past the spare columns on the right: at least one re-layout
    leave(1)
    leave(2)  # the longest departs: the span shrinks
    join(3)
    step(5)
    assert batch.reallocations >= 2
    assert sorted(rows) == [3, 4]
    assert [len(t) for t in tokens] == [6, 74, 71, 6, 79]
    for t, ref in zip(tokens, reference, strict=True):
        assert t == ref[: len(t)]
    for i, r in enumerate(rows):
        assert batch.row(i).num_tokens == len(ps[r]) + len(tokens[r]) - 1


def test_a_steady_stream_of_requests_moves_the_cache_instead_of_reallocating(monkeypatch):
    """Continuous batching: requests keep joining and leaving, so the live region drifts right;
    it is moved back in place, and new buffers are needed only while the batch is still growing."""
    monkeypatch.setattr(kvcache, "RIGHT_ROOM", 8)
    model = tiny_model("llama")
    runner = ModelRunner(model)
    rng = random.Random(3)
    ps = [[rng.randrange(1, 257) for _ in range(rng.randrange(3, 12))] for _ in range(64)]
    budgets = [rng.randrange(4, 12) for _ in ps]
    reference = [reference_greedy(model, p, b, eos=set()) for p, b in zip(ps, budgets, strict=True)]
    outs = runner.prefill(ps)
    tokens = [[int(o.last_logits.argmax())] for o in outs]
    batch = runner.empty_batch(outs[0].kv, max_rows=4)
    rows: list[int] = []
    waiting = list(range(len(ps)))
    while waiting or rows:
        while waiting and len(rows) < 4:
            r = waiting.pop(0)
            batch.add(outs[r].kv)
            rows.append(r)
        logits = runner.decode_step(batch, [tokens[r][-1] for r in rows])
        for i, r in enumerate(rows):
            tokens[r].append(int(logits[i].argmax()))
        for r in [r for r in rows if len(tokens[r]) >= budgets[r]]:
            i = rows.index(r)
            batch.remove(i)
            last = rows.pop()
            if i < len(rows):
                rows[i] = last
    assert tokens == reference
    assert batch.moves >= 2
    assert batch.capacity_rows == 4
    with pytest.raises(ValueError, match="limit of 4 rows"):
        for o in outs[:5]:
            batch.add(o.kv)


def test_the_batch_grows_past_its_initial_rows():
    runner, reference, outs, tokens = _prefilled("opt", prompts(8), 4)
    batch = runner.empty_batch(outs[0].kv)
    for o in outs:  # one at a time, past the initial capacity of 4 rows
        batch.add(o.kv)
    for _ in range(3):
        logits = runner.decode_step(batch, [t[-1] for t in tokens])
        for i, row in enumerate(logits):
            tokens[i].append(int(row.argmax()))
    assert tokens == reference
    assert batch.capacity_rows >= 8


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
