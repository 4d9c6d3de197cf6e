"""Benchmark: a decode step at TP1 vs TP2 (vs TP1 with the same core budget), and greedy identity.

Each configuration runs as real rank processes (gloo on the CPU, NCCL on CUDA) over a random-weight
Llama built identically on every rank, sharded by the workers' own code (`tp/shard.py`) and run by
the engine's own runner and batched KV cache: prefill `batch` prompts of `context` tokens, then
`steps` greedy decode steps, each timed; the median step is reported. Rank 0 of each configuration
writes its figures and greedy tokens; the parent compares tokens across configurations.

    .venv/bin/python benchmarks/tp_decode.py                       # CPU: SmolLM2-sized, 8 heads
    .venv/bin/python benchmarks/tp_decode.py --shape llama-3-8b --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rank_main(args: argparse.Namespace) -> None:
    import torch

    from distserve_worker.engine.runner import ModelRunner
    from distserve_worker.kvtransfer.memory import keep_freed_memory
    from distserve_worker.profiling.randommodel import random_llama
    from distserve_worker.tp.ranks import JOIN_TIMEOUT, RankPlace, join
    from distserve_worker.tp.shard import shard_model

    keep_freed_memory(2 << 20)
    torch.set_num_threads(args.threads)
    args.tp = int(args.tp)
    place = RankPlace(args.rank, args.tp, args.port)
    if args.tp > 1:
        store = torch.distributed.TCPStore(
            "127.0.0.1", args.port, args.tp, is_master=args.rank == 0, timeout=JOIN_TIMEOUT
        )
        join(place, store)
    # Built whole on the rank's device (same seed on every rank: the same weights), then sharded.
    device = place.device if args.device == "cuda" else torch.device("cpu")
    model = shard_model(random_llama(args.shape, args.dtype, str(device)), args.tp, args.rank)
    runner = ModelRunner(model, args.threads)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (args.context,), generator=g).tolist() for _ in range(args.batch)]
    outs = runner.prefill(prompts)
    batch = runner.empty_batch(outs[0].kv, args.batch)
    for out in outs:
        batch.add(out.kv)
    tokens = [[int(o.last_logits.argmax())] for o in outs]
    first_logits = outs[0].last_logits.float()
    times = []
    for _ in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        logits = runner.decode_step(batch, [t[-1] for t in tokens])
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
        for row, t in zip(logits, tokens, strict=True):
            t.append(int(row.argmax()))
    if args.rank == 0:
        Path(args.out).write_text(
            json.dumps(
                {
                    "step_ms_median": statistics.median(times[2:] or times),
                    "step_ms": times,
                    "tokens": tokens,
                    "first_logits_head": first_logits[:64].tolist(),
                    "parameters_rank0": runner.parameters,
                    "device": str(place.device) if args.device != "cpu" else "cpu",
                    "backend": place.backend if args.tp > 1 else "-",
                }
            )
        )


def first_difference(a: list[list[int]], b: list[list[int]]) -> int:
    """The first decode step at which any row's greedy token differs."""
    steps = len(a[0])
    return next(i for i in range(steps) if any(x[i] != y[i] for x, y in zip(a, b, strict=True)))


def run_config(args: argparse.Namespace, tp: int, threads: int) -> dict:
    from distserve_worker.local.stack import free_port

    port = free_port()
    out = Path(tempfile.mkdtemp()) / "rank0.json"
    common = [
        "--shape",
        args.shape,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
    ]
    common += ["--context", str(args.context), "--steps", str(args.steps), "--threads", str(threads)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank-worker",
                "--rank",
                str(r),
                "--tp",
                str(tp),
                "--port",
                str(port),
                "--out",
                str(out),
                *common,
            ]
        )
        for r in range(tp)
    ]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"TP{tp} rank exited with {p.returncode}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smol-h8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tp", default="1,2", help="comma-separated TP degrees")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", default="")
    # internal: one rank of one configuration
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_main(args)
        sys.stdout.flush()
        os._exit(0)  # skip gloo's C++ destructors, which can abort at interpreter exit
    degrees = [int(x) for x in args.tp.split(",")]
    configs = [(tp, args.threads) for tp in degrees]
    if args.device == "cpu" and max(degrees) > 1:  # TP1 given the cores all the ranks of TPn use
        configs.insert(1, (1, args.threads * max(degrees)))
    results = {}
    for tp, threads in configs:
        label = f"TP{tp} x {threads} thread(s)" + ("/rank" if tp > 1 else "")
        print(f"running {label} ...", flush=True)
        results[label] = run_config(args, tp, threads) | {"tp": tp, "threads": threads}
    base_label = next(iter(results))
    base = results[base_label]
    print(
        f"\n{args.shape} {args.dtype} on {args.device}: batch {args.batch}, context {args.context}, {args.steps} steps"
    )
    print(
        f"{'configuration':28} {'step ms (median)':>17} {'vs ' + base_label:>22} {'greedy = TP1':>13} {'params rank 0':>14}"
    )
    for label, r in results.items():
        same = r["tokens"] == base["tokens"]
        diverge = "" if same else f" (from step {first_difference(r['tokens'], base['tokens'])})"
        print(
            f"{label:28} {r['step_ms_median']:17.1f} {base['step_ms_median'] / r['step_ms_median']:21.2f}x "
            f"{'yes' if same else 'no' + diverge:>13} {r['parameters_rank0']:14,}"
        )
    diff = max(
        abs(a - b)
        for r in results.values()
        for a, b in zip(r["first_logits_head"], base["first_logits_head"], strict=True)
    )
    print(f"max |logit difference| at the first token vs {base_label}: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    k: {kk: vv for kk, vv in v.items() if kk != "first_logits_head"}
                    for k, v in results.items()
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
