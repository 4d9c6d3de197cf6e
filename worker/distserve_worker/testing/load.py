"""Open-loop load on a running stack: each request is sent at its arrival time whatever the others
are doing, streams its tokens (SSE), and records TTFT and TPOT client-side. Used by the fidelity
benchmarks and by `distserve profile --in-stack`.

Prompts are random token ids of exactly the requested length; `ignore_eos` makes every output
exactly `max_tokens` long, so the real stack and the simulator see the same request lengths.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import aiohttp

from distserve_worker.testing.client import complete

# Ordinary vocabulary ids of SmolLM2 (clear of the special tokens at the start of its vocabulary).
TOKEN_RANGE = (1000, 40000)


@dataclass(frozen=True)
class Measured:
    ttft_ms: float
    tpot_ms: float
    ok: bool
    error: str = ""
    # The router's breakdown of TTFT (its `distserve` block): queued at prefill, prefill forward
    # to answer, and prefill answer to first token out of the router.
    prefill_queue_ms: float = 0.0
    prefill_ms: float = 0.0
    handoff_ms: float = 0.0


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], output: int, delay: float
) -> Measured:
    await asyncio.sleep(delay)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    try:
        result = await complete(session, f"{url}/v1/completions", body, timeout=600.0)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Measured(float("inf"), float("inf"), False, str(exc))
    if result.status != 200 or result.error or result.ttft is None:
        return Measured(float("inf"), float("inf"), False, str(result.error or result.status))
    ttft = result.ttft * 1e3
    # The last event arrives with the last token; [DONE] follows at once.
    tpot = (result.elapsed * 1e3 - ttft) / (output - 1) if output > 1 else 0.0
    info = result.body.get("distserve", {})
    return Measured(
        ttft,
        tpot,
        True,
        prefill_queue_ms=info.get("prefill_queue_ms") or 0.0,
        prefill_ms=info.get("prefill_ms") or 0.0,
        handoff_ms=info.get("handoff_ms") or 0.0,
    )


def token_range(vocab: int) -> tuple[int, int]:
    """SmolLM2's ordinary ids, or for a small vocabulary (the tests' tiny models) all but id 0."""
    return TOKEN_RANGE if vocab > TOKEN_RANGE[1] else (1, vocab)


def prompts(inputs: list[int], seed: int, ids: tuple[int, int] = TOKEN_RANGE) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*ids) for _ in range(n)] for n in inputs]


async def run_load(
    url: str,
    model: str,
    arrivals_s: list[float],
    inputs: list[int],
    outputs: list[int],
    seed: int = 0,
    ids: tuple[int, int] = TOKEN_RANGE,
) -> tuple[list[Measured], float]:
    """(per-request results in request order, wall seconds from the first send to the last answer)."""
    bodies = prompts(inputs, seed, ids)
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue on the client's side
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_one(session, url, model, p, o, a) for p, o, a in zip(bodies, outputs, arrivals_s, strict=True))
        )
        return list(results), time.perf_counter() - started
