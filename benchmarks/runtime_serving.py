"""Benchmark the serving runtime on SmolLM2-135M-Instruct (the embedded GGUF), on this machine's CPU.

One run measures, as ratios against a baseline from the same run (medians):
  1. decode throughput with 16 concurrent sequences vs 1 (continuous batching; target >= 4x);
  2. pulling a 64 MiB KV cache over gRPC vs a raw TCP socket on loopback (target >= 50%);
  3. end-to-end output tokens/s for 32 concurrent requests x 32 new tokens through the
     disaggregated stack vs transformers' `generate_batch` (continuous batching) and vs
     `generate` one request at a time, same model, prompts and cores (target >= 1.0x);
  4. KV transfer time as a share of TTFT for a 1,000-token prompt (target <= 10%).

    .venv/bin/python benchmarks/runtime_serving.py [--runs 3] [--json FILE]

The stack is the real one: router, prefill and decode as separate processes, gRPC on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec, load_model

SPEC = ModelSpec()
TOPICS = [
    "the sea",
    "mountains",
    "a city at night",
    "coffee",
    "rain",
    "a library",
    "trains",
    "the moon",
    "autumn",
    "a garden",
    "bicycles",
    "snow",
    "the desert",
    "a market",
    "music",
    "a bridge",
    "the forest",
    "a lighthouse",
    "bread",
    "a river",
    "winter",
    "clocks",
    "the sky",
    "a cat",
    "an old house",
    "the harbor",
    "a storm",
    "tea",
    "a festival",
    "stars",
    "a valley",
    "the wind",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}],
            add_generation_prompt=True,
            tokenize=True,
        )["input_ids"]
        for i in range(n)
    ]


async def stream_one(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {
        "model": SPEC.name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    first = last = None
    tokens = 0
    info: dict = {}
    async with session.post(
        url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=600)
    ) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
            info = event.get("distserve", info)
    return {"first": first, "last": last, "tokens": tokens, **info}


async def concurrent(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[dict]]:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_one(session, url, p, max_tokens) for p in prompts))
        return time.perf_counter() - started, results


def decode_throughput(results: list[dict]) -> float:
    """Tokens after the first, over the span in which decode produced them."""
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    return sum(r["tokens"] - 1 for r in results) / span


def hf_baselines(prompts: list[list[int]], new_tokens: int, runs: int) -> dict[str, float]:
    import torch
    from transformers import GenerationConfig

    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_model(SPEC)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    batch_rates = []
    for _ in range(runs):
        started = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        wall = time.perf_counter() - started
        produced = sum(len(o.generated_tokens) for o in out.values())
        batch_rates.append(produced / wall)
    started = time.perf_counter()
    produced = 0
    for p in prompts:  # one request at a time: a single run, it is slow and steady
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        produced += out.shape[1] - ids.shape[1]
    sequential = produced / (time.perf_counter() - started)
    del model
    return {"generate_batch_tok_s": statistics.median(batch_rates), "generate_sequential_tok_s": sequential}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default="")
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
    args = parser.parse_args()
    from runtime_kv_transfer import measure as measure_kv

    _, tokenizer = load_model(SPEC)  # also converts the GGUF once, before anything is timed
    figures: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
    }
    prompts32 = chat_prompts(tokenizer, 32)

    # 2. KV transfer, gRPC vs socket (no model needed).
    kv = measure_kv(runs=max(5, args.runs), chunk_mib=2.0)
    figures["kv_pull"] = kv
    print(
        f"[2] KV pull 64 MiB: gRPC {kv['grpc_MiB_per_s']:.0f} MiB/s vs socket {kv['socket_MiB_per_s']:.0f} MiB/s = {100 * kv['ratio']:.0f}% (plain gRPC bytes: {100 * kv['raw_grpc_ratio']:.0f}%)",
        flush=True,
    )

    # 3 (baseline). transformers on the same prompts and cores.
    if not args.skip_hf:
        hf = hf_baselines(prompts32, 32, args.runs)
        figures["hf"] = hf
        print(
            f"[3] transformers: generate_batch {hf['generate_batch_tok_s']:.1f} tok/s, generate one at a time {hf['generate_sequential_tok_s']:.1f} tok/s",
            flush=True,
        )

    cores = os.cpu_count() or 2
    stack = LocalStack(StackConfig(SPEC, threads=cores))
    stack.start()
    try:
        stack.wait_ready(600)
        url = stack.url
        # warm-up: first forwards allocate
        asyncio.run(concurrent(url, prompts32[:4], 8))

        # 1. decode throughput, 16 concurrent vs 1.
        rates: dict[int, list[float]] = {1: [], 16: []}
        for _ in range(args.runs):
            for c in (1, 16):
                _, results = asyncio.run(concurrent(url, prompts32[:c], 48))
                rates[c].append(decode_throughput(results))
        d1, d16 = statistics.median(rates[1]), statistics.median(rates[16])
        figures["decode"] = {"tok_s_1": d1, "tok_s_16": d16, "ratio": d16 / d1}
        print(
            f"[1] decode: 1 sequence {d1:.1f} tok/s, 16 sequences {d16:.1f} tok/s = {d16 / d1:.1f}x",
            flush=True,
        )

        # 3. end to end, 32 concurrent x 32 new tokens.
        e2e = []
        for _ in range(args.runs):
            wall, results = asyncio.run(concurrent(url, prompts32, 32))
            e2e.append(sum(r["tokens"] for r in results) / wall)
        ours = statistics.median(e2e)
        figures["e2e"] = {"tok_s": ours}
        if "hf" in figures:
            hf = figures["hf"]  # type: ignore[assignment]
            figures["e2e"] |= {
                "vs_generate_batch": ours / hf["generate_batch_tok_s"],
                "vs_generate_sequential": ours / hf["generate_sequential_tok_s"],
            }
            print(
                f"[3] end to end: {ours:.1f} tok/s = {ours / hf['generate_batch_tok_s']:.2f}x generate_batch, {ours / hf['generate_sequential_tok_s']:.2f}x sequential generate",
                flush=True,
            )
        else:
            print(f"[3] end to end: {ours:.1f} tok/s", flush=True)

        # 4. KV transfer share of TTFT, 1,000-token prompt.
        words = tokenizer("the quick brown fox jumps over the lazy dog " * 200)["input_ids"]
        shares, ttfts, transfers = [], [], []
        for i in range(max(3, args.runs)):
            prompt = [words[(i + j) % len(words)] for j in range(1000)]
            _, (r,) = asyncio.run(concurrent(url, [prompt], 2))
            shares.append(r["kv_transfer_ms"] / r["ttft_ms"])
            ttfts.append(r["ttft_ms"])
            transfers.append(r["kv_transfer_ms"])
        figures["ttft_1000"] = {
            "ttft_ms": statistics.median(ttfts),
            "kv_transfer_ms": statistics.median(transfers),
            "share": statistics.median(shares),
        }
        print(
            f"[4] 1,000-token prompt: TTFT {statistics.median(ttfts):.0f} ms, KV transfer {statistics.median(transfers):.1f} ms = {100 * statistics.median(shares):.1f}% of TTFT",
            flush=True,
        )
    finally:
        stack.stop()
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
