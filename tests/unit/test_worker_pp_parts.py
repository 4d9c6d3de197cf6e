"""Pipeline stages' pure parts and one-process checks: which KV pieces each decode rank pulls across
stage and TP splits, the hidden-state wire format, and a model cut into stages computing what the
whole model computes."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from distserve_protos.stage.v1 import stage_pb2 as pb
from distserve_worker.engine.runner import ModelRunner
from distserve_worker.pp.partial import StageError, keep_stage
from distserve_worker.pp.pieces import SourceStage, layer_spans, pieces_to_pull
from distserve_worker.pp.wire import StageWireError, forward_messages, read_forward
from distserve_worker.testing.tiny import TP_ARCHITECTURES, tiny_model


def splits(total: int, pp: int) -> list[list[tuple[int, int]]]:
    """Every way to cut `total` layers into `pp` contiguous non-empty stages."""
    out = []
    for cuts in itertools.combinations(range(1, total), pp - 1):
        bounds = [0, *cuts, total]
        out.append(list(itertools.pairwise(bounds)))
    return out


@pytest.mark.parametrize(("prefill_pp", "decode_pp"), [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (2, 4)])
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 1), (2, 4)])
def test_every_decode_rank_gets_its_layers_and_heads_exactly_once(
    prefill_pp, decode_pp, prefill_tp, decode_tp
):
    layers, kv_heads = 6, 4
    for prefill_split in splits(layers, prefill_pp):
        sources = [
            SourceStage(span, tuple(f"p{s}r{r}" for r in range(prefill_tp)))
            for s, span in enumerate(prefill_split)
        ]
        for decode_split in splits(layers, decode_pp):
            for span in decode_split:
                for rank in range(decode_tp):
                    pieces = pieces_to_pull(sources, span, kv_heads, decode_tp, rank)
                    per = kv_heads // decode_tp
                    # Every (layer, head) this rank holds, from exactly one piece.
                    cells = [(lyr, h) for p in pieces for lyr in range(*p.layers) for h in range(*p.heads)]
                    want = [(lyr, h) for lyr in range(*span) for h in range(rank * per, (rank + 1) * per)]
                    assert sorted(cells) == want
                    # Each piece comes from the prefill stage and rank that hold it.
                    for p in pieces:
                        stage = next(i for i, s in enumerate(prefill_split) if s[0] <= p.layers[0] < s[1])
                        assert p.layers[1] <= prefill_split[stage][1]
                        source_rank = int(p.address.split("r")[1])
                        hp = kv_heads // prefill_tp
                        assert source_rank * hp <= p.heads[0] and p.heads[1] <= (source_rank + 1) * hp
                        assert p.address.startswith(f"p{stage}")
                    # A prefill rank prepared every piece it is asked for.
                    for p in pieces:
                        stage = int(p.address[1:].split("r")[0])
                        assert p.layers in layer_spans(prefill_split[stage], decode_split, layers)


def test_the_same_split_on_both_sides_is_one_piece_per_rank():
    sources = [SourceStage((0, 19), ("a:1",)), SourceStage((19, 30), ("b:1",))]
    assert [p.layers for p in pieces_to_pull(sources, (0, 19), 3, 1, 0)] == [(0, 19)]
    assert [(p.address, p.layers) for p in pieces_to_pull(sources, (19, 30), 3, 1, 0)] == [("b:1", (19, 30))]
    # A whole-model decode stage pulls both halves; prefill stages cut at a decode boundary.
    assert [p.layers for p in pieces_to_pull(sources, (0, 30), 3, 1, 0)] == [(0, 19), (19, 30)]
    assert layer_spans((0, 19), [(0, 15), (15, 30)], 30) == [(0, 15), (15, 19)]
    assert layer_spans((0, 19), [], 30) == [(0, 19)]


def test_prefill_stages_that_do_not_cover_the_layers_are_refused():
    with pytest.raises(ValueError, match="do not cover"):
        pieces_to_pull([SourceStage((0, 10), ("a:1",))], (5, 20), 2, 1, 0)


async def _read(messages):
    async def stream():
        for m in messages:
            yield m

    return await read_forward(stream(), 1 << 30)


async def test_hidden_states_round_trip_in_checked_chunks():
    hidden = torch.randn(3, 17, 64)
    header = pb.ForwardHeader(decode=pb.DecodeWork(lane=1, sample_index=[1, 2, 3]))
    messages = list(forward_messages(header, hidden, max_chunk_bytes=1000))
    assert len(messages) == 1 + -(-hidden.numel() * 4 // 1000)  # header + chunks of <= 1000 bytes
    got_header, got = await _read(messages)
    assert torch.equal(got, hidden) and got_header.decode.lane == 1 and list(got_header.shape) == [3, 17, 64]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda ms: ms[:-1], "announced"),  # the last chunk lost
        (lambda ms: [ms[0], ms[2], ms[1], *ms[3:]], "arrived where chunk 0 was due"),
        (lambda ms: ms[1:], "before the header"),
        (lambda ms: [ms[0], ms[0], *ms[1:]], "second header"),
    ],
)
async def test_a_malformed_forward_is_refused_with_the_reason(spoil, reason):
    messages = list(forward_messages(pb.ForwardHeader(), torch.randn(2, 300), max_chunk_bytes=1000))
    with pytest.raises(StageWireError, match=reason):
        await _read(spoil(messages))


async def test_a_corrupt_chunk_fails_its_checksum():
    messages = list(forward_messages(pb.ForwardHeader(), torch.randn(2, 300), max_chunk_bytes=1000))
    messages[1].chunk.data = b"\0" + messages[1].chunk.data[1:]
    with pytest.raises(StageWireError, match="XXH3-64"):
        await _read(messages)


@pytest.mark.parametrize("arch", TP_ARCHITECTURES)
def test_stages_compute_what_the_whole_model_computes(arch):
    full = tiny_model(arch, layers=4)
    whole = ModelRunner(copy.deepcopy(full))
    stages = [ModelRunner(keep_stage(copy.deepcopy(full), a, b)) for a, b in ((0, 1), (1, 3), (3, 4))]
    assert [len(s.model.model.layers) for s in stages] == [1, 2, 1]
    assert stages[1].model.model.embed_tokens is None and stages[1].model.lm_head is None
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    expected = whole.prefill(prompts)
    hidden, outs = None, []
    for stage in stages:
        out, hidden = stage.prefill_stage(prompts, hidden)
        outs.append(out)
    for want, got in zip(expected, outs[-1], strict=True):
        assert torch.allclose(want.last_logits, got.last_logits, atol=1e-5)
    # Each stage's cache is exactly its own layers of the whole model's.
    assert torch.allclose(outs[1][0].kv.layers[1][0], expected[0].kv.layers[2][0])
    batches = [s.batch([o.kv for o in out]) for s, out in zip(stages, outs, strict=True)]
    reference = whole.batch([o.kv for o in expected])
    tokens = [int(o.last_logits.argmax()) for o in expected]
    for _ in range(3):
        want = whole.decode_step(reference, tokens)
        h = None
        for stage, batch in zip(stages, batches, strict=True):
            h = stage.decode_step(batch, tokens, h)
        assert torch.allclose(want, h, atol=1e-5)
        tokens = want.argmax(-1).tolist()


def test_a_model_without_llama_style_layers_is_refused():
    with pytest.raises(StageError, match="Llama-style"):
        keep_stage(tiny_model("opt"), 0, 1)
    with pytest.raises(StageError, match="not inside"):
        keep_stage(tiny_model("llama"), 1, 3)
