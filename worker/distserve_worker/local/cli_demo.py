"""`distserve demo` (what `make demo` runs): the local stack on SmolLM2, a few real requests, stop.

Plans `deploy/examples/local-smollm2.yaml` when run from a checkout (the built-in equivalent
otherwise), starts router + prefill + decode as separate processes, sends a few requests (one of
them streamed, token by token), prints each answer with its TTFT, TPOT and whether it met the
SLO, then the attainment over all of them, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from distserve_worker.local.cli_up import LocalPlan, PlanNotRunnable, plan_manifest, start_stack
from distserve_worker.model_source import ModelSpec

DEFAULT_MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "local-smollm2.yaml"

QUESTIONS = [
    ("chat", "What is the capital of France?", False),
    ("chat", "Write a haiku about the sea.", True),
    ("completion", "The three primary colors are", False),
    ("chat", "Give me one tip for writing clear code.", False),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--file", default="", help=f"manifest (default: {DEFAULT_MANIFEST.name} when present)"
    )
    parser.add_argument("--port", type=int, default=0, help="router HTTP port (default: any free port)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--keep-logs", action="store_true", help="print where the processes' logs are")


def builtin_plan() -> LocalPlan:
    return LocalPlan("smollm2", ModelSpec(), 1, 1, (1000, 200), 90.0, "(built-in plan: 1 prefill + 1 decode)")


def prepare_model(spec: ModelSpec) -> None:
    """First run only: de-quantize the GGUF once here, with progress, so the workers start fast."""
    from distserve_worker.model_source import _effective, resolve_model_source

    if resolve_model_source(spec).gguf_file and _effective(spec).gguf_file:
        print(
            "first run: converting the embedded GGUF model once (about half a minute on a CPU) ...",
            flush=True,
        )
        from distserve_worker.model_source import load_model

        load_model(spec)


async def ask(url: str, model: str, kind: str, text: str, stream: bool, max_tokens: int) -> dict[str, object]:
    import aiohttp

    from distserve_worker.testing.client import complete

    body: dict[str, object] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": text}]
        endpoint = "/v1/chat/completions"
    else:
        body["prompt"] = text
        endpoint = "/v1/completions"
    async with aiohttp.ClientSession() as session:
        if not stream:
            result = await complete(session, url + endpoint, body, timeout=300)
            if result.error:
                raise RuntimeError(result.error["message"])
            return {"text": result.text, **result.body["distserve"]}
        # Streamed: print tokens as they arrive.
        import json

        info: dict[str, object] = {}
        pieces = []
        async with session.post(url + endpoint, json=body) as resp:
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                delta = event["choices"][0].get("delta", {}).get("content") or event["choices"][0].get(
                    "text", ""
                )
                pieces.append(delta)
                print(delta, end="", flush=True)
                info = event.get("distserve", info)
        print()
        return {"text": "".join(pieces), **info}


def run(args: argparse.Namespace) -> int:
    manifest = Path(args.file) if args.file else DEFAULT_MANIFEST
    plan = plan_manifest(manifest) if manifest.is_file() else builtin_plan()
    print(
        f"== distserve demo: {plan.model.name}, SLO TTFT {plan.slo_millis[0]} ms / TPOT {plan.slo_millis[1]} ms"
    )
    print(plan.summary)
    prepare_model(plan.model)
    try:
        stack = start_stack(plan, args.port, max_replicas=1, threads=0)
    except (PlanNotRunnable, OSError) as exc:
        print(f"distserve demo: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print("starting router, prefill and decode (separate processes) ...", flush=True)
    stack.start()
    rows = []
    try:
        stack.wait_ready(timeout=600)
        print(f"serving at {stack.url} (ready in {time.perf_counter() - started:.1f} s)\n")
        for kind, text, stream in QUESTIONS:
            print(f"> {text}{'   [streamed]' if stream else ''}")
            info = asyncio.run(ask(stack.url, plan.model.name, kind, text, stream, args.max_tokens))
            if not stream:
                print(str(info["text"]).strip())
            met = info.get("slo_attained")
            print(
                f"  TTFT {info['ttft_ms']} ms | TPOT {info['tpot_ms']} ms | KV transfer {info['kv_transfer_ms']} ms"
                f" | SLO {'met' if met else 'missed'}\n"
            )
            rows.append(info)
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        for proc in stack.procs:
            print(f"--- {proc.name} log:\n{proc.log_tail(15)}", file=sys.stderr)
        return 1
    finally:
        print("shutting down ...", flush=True)
        stack.stop()
    attained = sum(1 for r in rows if r.get("slo_attained"))
    ttfts = [float(r["ttft_ms"]) for r in rows]  # type: ignore[arg-type]
    tpots = [float(r["tpot_ms"]) for r in rows if r.get("tpot_ms") is not None]  # type: ignore[arg-type]
    print(
        f"{len(rows)} requests: median TTFT {statistics.median(ttfts):.0f} ms, median TPOT "
        f"{statistics.median(tpots):.1f} ms, SLO attainment {100 * attained / len(rows):.0f}% "
        f"(target {plan.attainment_percent:.0f}%)"
    )
    if args.keep_logs:
        print(f"logs: {stack.log_dir}")
    return 0
