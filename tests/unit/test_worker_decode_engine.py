"""The decode engine alone (engine/decoder.py): continuous batching over a tiny Llama, caches taken
in-process (`LocalSource`), no gRPC. Greedy tokens equal the one-sequence reference loop, the batch
never exceeds its limit, caches are released once taken, and an aborted sequence leaves."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_worker.engine.decoder import DecodeEngine, DecodeLimits, Stream
from distserve_worker.engine.detokenizer import Detokenizer
from distserve_worker.engine.runner import ModelRunner, reference_greedy
from distserve_worker.engine.sampling import SamplingParams
from distserve_worker.engine.sequence import Sequence
from distserve_worker.kvtransfer.buffer import KVBuffer
from distserve_worker.kvtransfer.source import LocalSource
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.testing.tiny import byte_tokenizer, tiny_model


def prompts(n, seed=3):
    rng = random.Random(seed)
    return [[rng.randrange(1, 257) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


async def _engine(max_batch=4):
    model = tiny_model("llama")
    runner = ModelRunner(model, 1)
    buffer = KVBuffer(1 << 30, 60)
    engine = DecodeEngine(
        runner,
        DecodeLimits(max_batch=max_batch, max_kv_tokens=1 << 20, max_context=512),
        eos=set(),
        source=LocalSource(buffer),
        metrics=RuntimeMetrics("decode", "tiny"),
        executor=ThreadPoolExecutor(max_workers=1),
    )
    return model, runner, buffer, engine


async def _prefilled(runner, buffer, rid, prompt, max_tokens):
    (out,) = runner.prefill([prompt])
    await buffer.reserve(rid, out.kv.nbytes)
    buffer.store(rid, out.kv, out.kv.nbytes)
    seq = Sequence(rid, len(prompt), int(out.last_logits.argmax()), max_tokens)
    seq.detok = Stream(SamplingParams(), Detokenizer(byte_tokenizer()), ignore_eos=True)
    return seq


async def _collect(seq) -> list[int]:
    tokens = [seq.first_token]
    while True:
        event = await seq.detok.events.get()
        assert not isinstance(event, Exception), event
        tokens.append(event.token_id)
        if event.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
            return tokens


async def test_engine_matches_the_reference_and_respects_its_batch_limit():
    model, runner, buffer, engine = await _engine(max_batch=4)
    ps = prompts(10)
    seqs = [await _prefilled(runner, buffer, f"r{i}", p, 9) for i, p in enumerate(ps)]
    for seq in seqs:
        engine.emit(seq, seq.first_token)
        engine.add(seq)
    sizes = []
    collectors = [asyncio.ensure_future(_collect(s)) for s in seqs]
    while not all(c.done() for c in collectors):
        if not await engine.step():
            await asyncio.sleep(0.001)  # caches being taken
        if engine.batch is not None:
            sizes.append(engine.batch.rows)
    results = [c.result() for c in collectors]
    assert results == [reference_greedy(model, p, 9, eos=set()) for p in ps]
    assert max(sizes) == 4  # full batches, never more than the limit
    assert buffer.used == 0  # every cache released once taken


async def test_an_aborted_sequence_leaves_the_batch_and_the_rest_finish():
    model, runner, buffer, engine = await _engine()
    ps = prompts(3)
    seqs = [await _prefilled(runner, buffer, f"a{i}", p, 30) for i, p in enumerate(ps)]
    for seq in seqs:
        engine.add(seq)
    while engine.batch is None or engine.batch.rows < 3:
        await engine.step() or await asyncio.sleep(0.001)
    engine.abort(seqs[1])
    await engine.step()
    assert engine.batch.rows == 2 and seqs[1].finished
    others = [asyncio.ensure_future(_collect(s)) for s in (seqs[0], seqs[2])]
    while not all(c.done() for c in others):
        await engine.step() or await asyncio.sleep(0.001)
    assert others[0].result()[-1] == reference_greedy(model, ps[0], 30, eos=set())[-1]


async def test_an_aborted_sequence_that_was_still_waiting_has_its_cache_released_at_once():
    """Nobody will pull it now: its prefill side frees it at once, not at its deadline."""
    _, runner, buffer, engine = await _engine(max_batch=1)
    running, waiting = [await _prefilled(runner, buffer, f"w{i}", p, 30) for i, p in enumerate(prompts(2))]
    engine.add(running)
    engine.add(waiting)  # no slot: it waits, its cache still held
    while engine.batch is None:
        await engine.step() or await asyncio.sleep(0.001)
    assert buffer.get("w1") is not None
    engine.abort(waiting)
    await asyncio.gather(*engine.releases)
    assert buffer.get("w1") is None and waiting.finished
