"""Timing the engine's forwards the way the workers run them.

Prefill: `ModelRunner.prefill` on a batch, the first-token sample, and the KV cache's wire encoding
(the prefill worker answers only after encoding, so it is part of every TTFT). Decode: one
`ModelRunner.decode_step` over a padded batch plus sampling every row. Each point is the median of
a few repetitions after one warm-up, so a neighbour's job on a shared machine moves it less.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from distserve_worker.engine.kvcache import BatchedKV, SequenceKV
from distserve_worker.engine.runner import ModelRunner
from distserve_worker.engine.sampling import SamplingParams, sample
from distserve_worker.kvtransfer.codec import encode_cache
from distserve_worker.profiling.fit import DecodePoint, PrefillPoint

GREEDY = SamplingParams()
CHUNK_BYTES = 2 * 1024 * 1024  # the workers' default --max-chunk-mib


@dataclass(frozen=True)
class Sweep:
    prefill_batches: tuple[tuple[int, ...], ...]  # each: the prompt lengths of one batch
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]  # context length per sequence
    repetitions: int = 3


FULL = Sweep(
    # Single prompts across the lengths a workload sees, and batches mixing count and length so
    # the fit can tell tokens (b) from squared lengths (c).
    prefill_batches=(
        (8,),
        (32,),
        (64,),
        (128,),
        (256,),
        (512,),
        (32, 32),
        (64, 64),
        (32,) * 4,
        (128, 128),
        (16,) * 8,
    ),
    # Dense in batch size: the step cost is piecewise (kernels change algorithm with the row
    # count; fit.fit_decode finds where), and a break needs two sizes on each side to be found.
    decode_batches=(1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32),
    decode_contexts=(32, 128, 384),
    repetitions=5,
)
QUICK = Sweep(
    prefill_batches=((4,), (8,), (16,), (32,), (64,), (8, 8), (16,) * 4, (32, 32)),
    decode_batches=(1, 2, 4, 8),
    decode_contexts=(8, 32, 96),
    repetitions=3,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - started) * 1e3


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def measure_prefill(
    runner: ModelRunner, sweep: Sweep, vocab: int, seed: int = 0, progress: bool = True
) -> list[PrefillPoint]:
    """Every point once per pass, in a fresh shuffled order each pass: a burst of someone else's
    work on a shared machine then lands on different points, and the median per point drops it."""
    rng = random.Random(seed)
    batches = [[_prompt(rng, n, vocab) for n in lengths] for lengths in sweep.prefill_batches]
    times: list[list[float]] = [[] for _ in batches]

    def run(prompts: list[list[int]]) -> None:
        for i, out in enumerate(runner.prefill(prompts)):
            sample(out.last_logits, GREEDY, index=0)
            encode_cache(f"profile-{i}", out.kv, CHUNK_BYTES)

    run(batches[0])  # warm-up: allocator, kernel selection
    order = list(range(len(batches)))
    for _ in range(sweep.repetitions):
        rng.shuffle(order)
        for i in order:
            times[i].append(_timed_ms(lambda i=i: run(batches[i]), runner.device))
        _say(progress, f"prefill pass {len(times[0])}/{sweep.repetitions} done")
    points = []
    for lengths, samples in zip(sweep.prefill_batches, times, strict=True):
        ms = statistics.median(samples)
        points.append(PrefillPoint(tuple(lengths), ms))
        _say(progress, f"prefill {'+'.join(map(str, lengths)):>16} tokens: {ms:8.2f} ms")
    return points


def _grown(kv: SequenceKV, copies: int) -> list[SequenceKV]:
    return [SequenceKV([(k.clone(), v.clone()) for k, v in kv.layers]) for _ in range(copies)]


def _decode_step(
    runner: ModelRunner, batch: BatchedKV, context: int, rng: random.Random, vocab: int
) -> Callable[[], None]:
    """One decode step over `batch` as the decode worker runs it: the forward, then a sample per row."""
    rows = batch.rows
    tokens = [rng.randrange(1, vocab) for _ in range(rows)]

    def step() -> None:  # each step caches one more token per row
        logits = runner.decode_step(batch, tokens)
        for row in range(rows):
            sample(logits[row], GREEDY, index=1)

    return step


def measure_decode(
    runner: ModelRunner, sweep: Sweep, vocab: int, seed: int = 0, progress: bool = True
) -> list[DecodePoint]:
    """Every (context, batch) batch is built first, then stepped once per pass in shuffled order
    (as for prefill). Each step caches one more token per row; `ctx_tokens` is the middle step's."""
    rng = random.Random(seed + 1)
    shapes: list[tuple[int, int]] = []
    steps: list[Callable[[], None]] = []
    for context in sweep.decode_contexts:
        kv = runner.prefill([_prompt(rng, context, vocab)])[0].kv
        for batch_size in sweep.decode_batches:
            shapes.append((context, batch_size))
            steps.append(_decode_step(runner, runner.batch(_grown(kv, batch_size)), context, rng, vocab))
    for step in steps:
        step()  # warm-up
    times: list[list[float]] = [[] for _ in steps]
    order = list(range(len(steps)))
    for n in range(sweep.repetitions):
        rng.shuffle(order)
        for i in order:
            times[i].append(_timed_ms(steps[i], runner.device))
        _say(progress, f"decode pass {n + 1}/{sweep.repetitions} done")
    points = []
    for (context, batch_size), samples in zip(shapes, times, strict=True):
        ms = statistics.median(samples)
        ctx = batch_size * (context + 1 + (sweep.repetitions + 1) // 2)
        points.append(DecodePoint(batch_size, ctx, ms))
        _say(progress, f"decode batch {batch_size:>3} x ctx {context:>4}: {ms:8.2f} ms/step")
    return points


def _say(progress: bool, line: str) -> None:
    if progress:
        print(f"[profile] {line}", file=sys.stderr, flush=True)


def vocab_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 256) or 256)


def measure_both(
    runner: ModelRunner, sweep: Sweep, seed: int, tag: str, progress: bool
) -> tuple[list[PrefillPoint], list[DecodePoint]]:
    """Prefill then decode points of one runner (one rank), saying which on stderr with `tag`
    (e.g. "TP2 (2 ranks on cuda, nccl)")."""
    vocab = vocab_size(runner.model)
    if progress:
        print(f"[profile] {tag}: prefill", file=sys.stderr, flush=True)
    prefill = measure_prefill(runner, sweep, vocab, seed, progress)
    if progress:
        print(f"[profile] {tag}: decode", file=sys.stderr, flush=True)
    return prefill, measure_decode(runner, sweep, vocab, seed, progress)
