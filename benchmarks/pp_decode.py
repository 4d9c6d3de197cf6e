"""Benchmark: pipeline stages on the real stack, PP2 vs PP1 decode, same run, same model.

Each configuration is a real local stack (`LocalStack` from a runtime contract: router, prefill and
decode processes, gRPC between them) serving SmolLM2-135M (the embedded GGUF, float32). Prefill is
one process (PP1) in every configuration; decode runs as:

- PP1, 1 torch thread (the reference),
- PP1, 2 torch threads (the same cores PP2's two stage processes use),
- PP2, 1 torch thread per stage process (the planner's cost-balanced split).

Figures per configuration, from the router's own per-request timing (`distserve` field):
- TPOT at batch 1: one request at a time, median over the requests; PP2 - PP1 is what the hops
  cost (two per token on loopback: the hidden states out to stage 1, the token ids back);
- TPOT at a saturated batch (`--batch` concurrent requests, `ignore_eos`) and decode throughput =
  batch / median TPOT;
- the KV pull of one long prompt's cache (`--kv-prompt` tokens), median: with PP2 each stage pulls
  its own layers, concurrently, against PP1's whole-model pull of the same request.
Greedy tokens are compared across configurations (they must be identical).

    .venv/bin/python benchmarks/pp_decode.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
from pathlib import Path
from typing import Any

LAYERS = 30  # SmolLM2-135M
CONFIGS = {
    "pp1-1thread": {"decode": (1, 1), "threads": 1},
    "pp1-2threads": {"decode": (1, 1), "threads": 2},
    "pp2-1thread-per-stage": {"decode": (1, 2), "threads": 1},
}


def decode_split() -> list[int]:
    """The planner's split for SmolLM2 decode PP2: what `distserve up` puts in the contract for a
    manifest pinned to it."""
    from distserve_operator.api import load_manifest
    from distserve_planner import plan_deployment
    from distserve_worker.testing.up import smollm2_manifest

    pin = "{prefill: {tp: 1, pp: 1, replicas: 1}, decode: {tp: 1, pp: 2, replicas: 1}}"
    path = Path(tempfile.mkdtemp(prefix="pp-bench-")) / "smollm2.yaml"
    path.write_text(smollm2_manifest("smollm2-pp2", pin))
    split = plan_deployment(load_manifest(path)).plan.decode.stage_layers
    assert split is not None and sum(split) == LAYERS
    return list(split)


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from distserve_worker.testing.client import complete

    rng = random.Random(3)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]

    def body(p: list[int], max_tokens: int) -> dict[str, Any]:
        return {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "prompt": p,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }

    async with aiohttp.ClientSession() as session:
        endpoint = f"{url}/v1/completions"
        await complete(session, endpoint, body(prompt(16), 8))  # warm-up: channels, first forwards
        single = [await complete(session, endpoint, body(prompt(64), args.tokens)) for _ in range(args.runs)]
        batch = await asyncio.gather(
            *(
                complete(session, endpoint, body(prompt(64), args.tokens), timeout=600)
                for _ in range(args.batch)
            )
        )
        kv = [await complete(session, endpoint, body(prompt(args.kv_prompt), 2)) for _ in range(args.runs)]
    for r in (*single, *batch, *kv):
        assert r.status == 200, r.body
    tpot1 = statistics.median(r.body["distserve"]["tpot_ms"] for r in single)
    tpotb = statistics.median(r.body["distserve"]["tpot_ms"] for r in batch)
    return {
        "tpot_batch1_ms": tpot1,
        "tpot_saturated_ms": tpotb,
        "throughput_tokens_per_s": args.batch / (tpotb / 1e3),
        "kv_pull_ms": statistics.median(r.body["distserve"]["kv_transfer_ms"] for r in kv),
        "tokens": [r.token_ids for r in single],
        "load": os.getloadavg()[0],
    }


def run_config(name: str, spec: dict[str, Any], args: argparse.Namespace, split: list[int]) -> dict[str, Any]:
    from distserve_worker.local.stack import LocalStack, StackConfig
    from distserve_worker.model_source import ModelSpec
    from distserve_worker.testing.plans import write_contract

    directory = Path(tempfile.mkdtemp(prefix=f"pp-bench-{name}-"))
    tp, pp = spec["decode"]
    plan = write_contract(
        directory,
        ModelSpec(),
        LAYERS,
        9,
        3,
        prefill=(1, 1),
        decode=(tp, pp),
        decode_split=split if pp == 2 else None,
        decode_max_batch=max(32, args.batch),
    )
    config = StackConfig.from_plan_file(plan, threads=spec["threads"], log_dir=directory)
    print(f"[{name}] starting (logs in {directory}) ...", flush=True)
    with LocalStack(config) as stack:
        stack.wait_ready(600)
        out = asyncio.run(measure(stack.url, args))
    print(
        f"[{name}] TPOT batch 1 {out['tpot_batch1_ms']:.1f} ms, batch {args.batch} {out['tpot_saturated_ms']:.1f} ms "
        f"({out['throughput_tokens_per_s']:.0f} tok/s), KV pull {out['kv_pull_ms']:.1f} ms",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="requests for the batch-1 and KV medians")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--batch", type=int, default=16, help="concurrent requests for the saturated figure")
    parser.add_argument("--kv-prompt", type=int, default=1000, help="prompt tokens of the KV-pull requests")
    args = parser.parse_args()
    from distserve_worker.model_source import ModelSpec, load_model

    load_model(ModelSpec(), device="cpu")  # converts the GGUF once, before the workers start
    split = decode_split()
    print(f"decode PP2 split (planner): {split} layers", flush=True)
    results = {name: run_config(name, spec, args, split) for name, spec in CONFIGS.items()}
    base = results["pp1-1thread"]
    identical = all(r["tokens"] == base["tokens"] for r in results.values())
    hop_ms = (results["pp2-1thread-per-stage"]["tpot_batch1_ms"] - base["tpot_batch1_ms"]) / 2
    print(f"\nSmolLM2-135M decode, batch 1 and batch {args.batch}; greedy tokens identical: {identical}")
    print(
        f"{'configuration':26} {'TPOT b=1':>9} {'vs PP1':>7} {'TPOT sat.':>10} {'tok/s':>7} {'vs PP1':>7} {'KV pull':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:26} {r['tpot_batch1_ms']:7.1f}ms {base['tpot_batch1_ms'] / r['tpot_batch1_ms']:6.2f}x "
            f"{r['tpot_saturated_ms']:8.1f}ms {r['throughput_tokens_per_s']:7.0f} "
            f"{r['throughput_tokens_per_s'] / base['throughput_tokens_per_s']:6.2f}x {r['kv_pull_ms']:6.1f}ms"
        )
    print(f"per hop on loopback (PP2 - PP1 at batch 1, two hops per token): {hop_ms:.2f} ms")
    print(
        json.dumps(
            {"split": split, "identical": identical, "hop_ms": hop_ms}
            | {k: {m: v for m, v in r.items() if m != "tokens"} for k, r in results.items()}
        )
    )


if __name__ == "__main__":
    main()
