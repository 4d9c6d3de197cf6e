"""`distserve worker prefill|decode|router|colocated`: run one process of the runtime (what pods run).

`colocated` is the baseline that runs both phases in one process (see colocated.py).

Every flag also reads an environment variable (shown in --help), so a pod spec can use either.
The model comes from `--plan-file` (the plan ConfigMap's plan.json, mounted) or from the --model-* flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from distserve_worker.colocated import ColocatedSettings
from distserve_worker.model_source import SOURCE_KINDS, ModelSpec
from distserve_worker.settings import DecodeSettings, MiB, PrefillSettings, RouterSettings

ROLES = ("prefill", "decode", "router", "colocated")


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"DISTSERVE_{name}", default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=ROLES)
    g = parser.add_argument_group("model")
    g.add_argument(
        "--plan-file",
        default=_env("PLAN_FILE", ""),
        help="plan.json from the plan ConfigMap [DISTSERVE_PLAN_FILE]",
    )
    g.add_argument("--model-name", default=_env("MODEL_NAME", ModelSpec.name), help="[DISTSERVE_MODEL_NAME]")
    g.add_argument(
        "--model-source",
        default=_env("MODEL_SOURCE", "Embedded"),
        choices=SOURCE_KINDS,
        help="[DISTSERVE_MODEL_SOURCE]",
    )
    g.add_argument(
        "--model-path", default=_env("MODEL_PATH", ""), help="directory or .gguf file [DISTSERVE_MODEL_PATH]"
    )
    g.add_argument(
        "--gguf-file",
        default=_env("GGUF_FILE", ""),
        help="GGUF file inside --model-path [DISTSERVE_GGUF_FILE]",
    )
    g.add_argument("--dtype", default=_env("DTYPE", "float32"), help="[DISTSERVE_DTYPE]")
    s = parser.add_argument_group("serving")
    s.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="listen address; 0.0.0.0 in a pod [DISTSERVE_HOST]"
    )
    s.add_argument(
        "--port",
        type=int,
        default=int(_env("PORT", 0)),
        help="gRPC (workers) or HTTP (router) port [DISTSERVE_PORT]",
    )
    s.add_argument(
        "--http-port",
        type=int,
        default=int(_env("HTTP_PORT", 0)),
        help="workers' /healthz /readyz /metrics port [DISTSERVE_HTTP_PORT]",
    )
    s.add_argument(
        "--advertise",
        default=_env("ADVERTISE", ""),
        help="host:port other instances use to reach this one [DISTSERVE_ADVERTISE]",
    )
    s.add_argument(
        "--threads", type=int, default=int(_env("THREADS", 0)), help="torch threads [DISTSERVE_THREADS]"
    )
    s.add_argument(
        "--max-chunk-mib",
        type=float,
        default=float(_env("MAX_CHUNK_MIB", 2)),
        help="KV chunk size [DISTSERVE_MAX_CHUNK_MIB]",
    )
    p = parser.add_argument_group("prefill")
    p.add_argument(
        "--token-budget", type=int, default=int(_env("TOKEN_BUDGET", 2048)), help="[DISTSERVE_TOKEN_BUDGET]"
    )
    p.add_argument(
        "--kv-buffer-mib",
        type=float,
        default=float(_env("KV_BUFFER_MIB", 512)),
        help="[DISTSERVE_KV_BUFFER_MIB]",
    )
    p.add_argument(
        "--kv-ttl-seconds",
        type=float,
        default=float(_env("KV_TTL_SECONDS", 60)),
        help="[DISTSERVE_KV_TTL_SECONDS]",
    )
    d = parser.add_argument_group("decode")
    d.add_argument("--max-batch", type=int, default=int(_env("MAX_BATCH", 32)), help="[DISTSERVE_MAX_BATCH]")
    d.add_argument(
        "--max-kv-tokens",
        type=int,
        default=int(_env("MAX_KV_TOKENS", 65536)),
        help="[DISTSERVE_MAX_KV_TOKENS]",
    )
    r = parser.add_argument_group("router")
    r.add_argument(
        "--prefill",
        default=_env("PREFILL", ""),
        help="comma-separated prefill host:port list [DISTSERVE_PREFILL]",
    )
    r.add_argument(
        "--decode",
        default=_env("DECODE", ""),
        help="comma-separated decode host:port list [DISTSERVE_DECODE]",
    )
    r.add_argument(
        "--prefill-dns",
        default=_env("PREFILL_DNS", ""),
        help="headless Service of prefill, e.g. NAME-prefill.NS.svc [DISTSERVE_PREFILL_DNS]",
    )
    r.add_argument(
        "--decode-dns",
        default=_env("DECODE_DNS", ""),
        help="headless Service of decode [DISTSERVE_DECODE_DNS]",
    )
    r.add_argument(
        "--prefill-port", type=int, default=int(_env("PREFILL_PORT", 50051)), help="[DISTSERVE_PREFILL_PORT]"
    )
    r.add_argument(
        "--decode-port", type=int, default=int(_env("DECODE_PORT", 50052)), help="[DISTSERVE_DECODE_PORT]"
    )
    r.add_argument(
        "--slo-ttft-millis",
        type=int,
        default=int(_env("SLO_TTFT_MILLIS", 0)),
        help="[DISTSERVE_SLO_TTFT_MILLIS]",
    )
    r.add_argument(
        "--slo-tpot-millis",
        type=int,
        default=int(_env("SLO_TPOT_MILLIS", 0)),
        help="[DISTSERVE_SLO_TPOT_MILLIS]",
    )


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_settings(
    args: argparse.Namespace,
) -> PrefillSettings | DecodeSettings | RouterSettings | ColocatedSettings:
    model = ModelSpec(args.model_name, args.model_source, args.model_path, args.dtype, args.gguf_file)
    ttft, tpot = args.slo_ttft_millis, args.slo_tpot_millis
    if args.plan_file:
        plan = json.loads(Path(args.plan_file).read_text())
        model = ModelSpec.from_plan_json(plan.get("model", {}))
        slo = plan.get("slo") or {}
        ttft = ttft or int(slo.get("ttftMillis", 0))
        tpot = tpot or int(slo.get("tpotMillis", 0))
    chunk = int(args.max_chunk_mib * MiB)
    common: dict[str, Any] = {
        "model": model,
        "host": args.host,
        "advertise": args.advertise,
        "instance": args.advertise,
    }
    common |= {"threads": args.threads, "max_chunk_bytes": chunk}
    if args.role == "colocated":
        port, http_port = args.port or 50051, args.http_port or 8081
        return ColocatedSettings(
            PrefillSettings(
                **common,
                port=port,
                http_port=http_port,
                token_budget=args.token_budget,
                kv_buffer_bytes=int(args.kv_buffer_mib * MiB),
                kv_ttl_seconds=args.kv_ttl_seconds,
            ),
            DecodeSettings(
                **common,
                port=port,
                http_port=http_port,
                max_batch=args.max_batch,
                max_kv_tokens=args.max_kv_tokens,
            ),
        )
    if args.role == "prefill":
        return PrefillSettings(
            **common,
            port=args.port or 50051,
            http_port=args.http_port or 8081,
            token_budget=args.token_budget,
            kv_buffer_bytes=int(args.kv_buffer_mib * MiB),
            kv_ttl_seconds=args.kv_ttl_seconds,
        )
    if args.role == "decode":
        return DecodeSettings(
            **common,
            port=args.port or 50052,
            http_port=args.http_port or 8082,
            max_batch=args.max_batch,
            max_kv_tokens=args.max_kv_tokens,
        )
    return RouterSettings(
        model=model,
        host=args.host,
        port=args.port or 8000,
        prefill=_split(args.prefill),
        decode=_split(args.decode),
        prefill_dns=args.prefill_dns,
        decode_dns=args.decode_dns,
        prefill_port=args.prefill_port,
        decode_port=args.decode_port,
        slo_ttft_seconds=ttft / 1000 if ttft else None,
        slo_tpot_seconds=tpot / 1000 if tpot else None,
    )


async def _serve(settings: PrefillSettings | DecodeSettings | RouterSettings | ColocatedSettings) -> None:
    if isinstance(settings, ColocatedSettings):
        from distserve_worker.colocated import serve_colocated

        coro = serve_colocated(settings)
    elif isinstance(settings, PrefillSettings):
        from distserve_worker.prefill import serve_prefill

        coro = serve_prefill(settings)
    elif isinstance(settings, DecodeSettings):
        from distserve_worker.decode import serve_decode

        coro = serve_decode(settings)
    else:
        from distserve_worker.router.app import serve_router

        coro = serve_router(settings)
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    # SIGTERM (kubelet, `distserve up` on shutdown) and SIGINT stop serving cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    if args.role != "router":
        from distserve_worker.kvtransfer.memory import keep_freed_memory

        # Before any tensor exists: per-step tensors and KV chunks are then reused warm for the
        # life of the process (see kvtransfer/memory.py); `distserve profile` does the same.
        keep_freed_memory(int(args.max_chunk_mib * MiB))
    asyncio.run(_serve(settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distserve_worker.cli_worker ROLE ...`: the same as `distserve worker ROLE ...`."""
    parser = argparse.ArgumentParser(prog="distserve worker", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
