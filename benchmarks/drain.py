"""Benchmark: scale-down under load in local mode; one decode instance of two drains (SIGTERM).

A real local stack (`LocalStack`: router, one prefill and two decode processes, gRPC between them)
serving SmolLM2-135M (the embedded GGUF, float32; `--tiny` for a tiny random Llama) takes an
open-loop Poisson load of streaming requests (`--rate` per second for `--seconds`; random prompts of
`--prompt` tokens, exactly `--tokens` output tokens each, `ignore_eos`). A third of the way in,
decode-1 gets SIGTERM, as the kubelet sends a pod that a scale-down removes: it stops taking new
requests, finishes its running ones and exits; the load goes on against decode-0 alone.

Figures (client-side, every request streamed and checked):
- requests completed vs sent (must be all): a request counts as completed only with every one of
  its tokens and no error; failed and truncated are counted apart;
- how long the drain took (SIGTERM to the process's exit) and its exit status;
- p90 TPOT of the requests streaming during the drain (any overlap with SIGTERM..exit) against the
  requests finished before the signal (the same run's baseline), and of those sent after the exit
  (one decode instance left: the capacity the scale-down removed shows there, not in the drain).

    .venv/bin/python benchmarks/drain.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Sent:
    sent: float
    first: float | None = None
    done: float | None = None
    chunks: int = 0
    error: str = ""

    def tpot_ms(self) -> float | None:
        if self.first is None or self.done is None or self.chunks < 2:
            return None
        return (self.done - self.first) / (self.chunks - 1) * 1e3


def p90(values: list[float]) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


async def one(session: Any, url: str, body: dict[str, Any], delay: float, zero: float) -> Sent:
    from distserve_worker.testing.client import complete

    await asyncio.sleep(delay)
    out = Sent(time.perf_counter() - zero)
    try:
        result = await complete(session, url, body, timeout=600)
    except Exception as exc:  # a benchmark counts failures, it does not stop at one
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.chunks = result.chunks
    if result.ttft is not None and result.last is not None:
        out.first, out.done = out.sent + result.ttft, out.sent + result.last
    if result.status != 200 or result.error:
        out.error = f"HTTP {result.status}: {str((result.error or {}).get('message', ''))[:200]}"
    return out


async def load(stack: Any, args: argparse.Namespace, model: str, vocab: tuple[int, int]) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(7)
    arrivals, t = [], 0.0
    while t < args.seconds:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    url = f"{stack.url}/v1/completions"
    victim = stack.proc("decode-1")
    signal_at = args.seconds / 3
    zero = time.perf_counter()

    async def scale_down() -> tuple[float, float, int]:
        await asyncio.sleep(signal_at)
        sent = time.perf_counter() - zero
        print(f"[{sent:5.1f} s] SIGTERM to decode-1 (a scale-down)", flush=True)
        stack.terminate("decode-1")
        code = await asyncio.to_thread(victim.popen.wait, 600)
        exited = time.perf_counter() - zero
        print(f"[{exited:5.1f} s] decode-1 exited with status {code}", flush=True)
        return sent, exited, code

    async def progress(tasks: list[asyncio.Task[Sent]]) -> None:
        while not all(task.done() for task in tasks):
            await asyncio.sleep(5)
            done = sum(task.done() for task in tasks)
            print(f"[{time.perf_counter() - zero:5.1f} s] {done}/{len(tasks)} requests finished", flush=True)

    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue on the client's side
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        bodies = [
            {
                "model": model,
                "prompt": [rng.randrange(*vocab) for _ in range(args.prompt)],
                "max_tokens": args.tokens,
                "ignore_eos": True,
                "temperature": 0,
                "stream": True,
            }
            for _ in arrivals
        ]
        # Warm-up, untimed: both decode instances (and prefill) run their first forwards.
        warm = await asyncio.gather(*(one(session, url, bodies[i], 0, zero) for i in range(4)))
        assert all(not w.error for w in warm), [w.error for w in warm]
        zero = time.perf_counter()
        tasks = [
            asyncio.create_task(one(session, url, b, a, zero)) for b, a in zip(bodies, arrivals, strict=True)
        ]
        drain = asyncio.create_task(scale_down())
        watcher = asyncio.create_task(progress(tasks))
        sent = await asyncio.gather(*tasks)
        signalled, exited, code = await drain
        watcher.cancel()
    complete = [s for s in sent if not s.error and s.chunks == args.tokens]
    failed = [s for s in sent if s.error and s.chunks == 0]
    truncated = [s for s in sent if s not in complete and s not in failed]
    before = [s.tpot_ms() for s in complete if s.done is not None and s.done < signalled]
    during = [
        s.tpot_ms()
        for s in complete
        if s.first is not None and s.done is not None and s.first < exited and s.done > signalled
    ]
    after = [s.tpot_ms() for s in complete if s.sent > exited]
    return {
        "sent": len(sent),
        "completed": len(complete),
        "failed": len(failed),
        "truncated": len(truncated),
        "errors": sorted({s.error for s in sent if s.error})[:5],
        "drain_seconds": exited - signalled,
        "exit_status": code,
        "tpot_p90_ms": {
            "before": p90([x for x in before if x is not None]),
            "during": p90([x for x in during if x is not None]),
            "after": p90([x for x in after if x is not None]),
        },
        "requests": {"before": len(before), "during": len(during), "after": len(after)},
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long requests are sent")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from distserve_worker.local.stack import LocalStack, StackConfig
    from distserve_worker.model_source import ModelSpec, load_model
    from distserve_worker.testing.load import token_range

    directory = Path(tempfile.mkdtemp(prefix="drain-bench-"))
    if args.tiny:
        from distserve_worker.testing.tiny import save_tiny_model

        path = save_tiny_model("llama", directory / "tiny", max_positions=4096)
        model = ModelSpec(name="tiny", kind="Path", path=str(path))
        vocab = token_range(257)
    else:
        model = ModelSpec()
        load_model(model, device="cpu")  # converts the GGUF once, before the workers start
        vocab = token_range(49152)
    config = StackConfig(model, prefill=1, decode=2, threads=args.threads, log_dir=directory)
    print(f"stack: 1 prefill + 2 decode processes of {model.name} (logs in {directory}) ...", flush=True)
    with LocalStack(config) as stack:
        stack.wait_ready(600)
        print(
            f"load: {args.rate:g} req/s for {args.seconds:g} s, {args.prompt} prompt + {args.tokens} output "
            "tokens each, streamed",
            flush=True,
        )
        out = asyncio.run(load(stack, args, model.name, vocab))
    t = out["tpot_p90_ms"]
    print(
        f"\nscale-down under load ({model.name}): decode-1 drained in {out['drain_seconds']:.1f} s, "
        f"exit status {out['exit_status']}"
    )
    print(
        f"requests completed {out['completed']} / sent {out['sent']} (failed {out['failed']}, "
        f"truncated {out['truncated']})"
    )
    print(f"{'TPOT p90':24} {'requests':>8} {'ms':>8} {'vs before':>9}")
    for phase, label in (
        ("before", "before the signal"),
        ("during", "during the drain"),
        ("after", "after (1 decode)"),
    ):
        print(f"{label:24} {out['requests'][phase]:8} {t[phase]:8.1f} {t[phase] / t['before']:8.2f}x")
    if out["errors"]:
        print("errors:", *out["errors"], sep="\n  ")
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
