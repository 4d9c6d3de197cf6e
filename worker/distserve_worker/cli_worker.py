"""`distserve worker prefill|decode|router|colocated`: run one process of the runtime (what pods run).

`colocated` is the baseline that runs both phases in one process (see colocated.py).

Every flag also reads an environment variable (shown in --help), so a pod spec can use either.
The model comes from `--plan-file` (the plan ConfigMap's plan.json, mounted) or from the --model-* flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from distserve_operator.api import EngineLimits, RuntimeContract, tp_refusal
from distserve_operator.api.runtime import MAX_TP
from distserve_worker.colocated import ColocatedSettings
from distserve_worker.contract import (
    ContractError,
    check_against_model,
    check_colocated,
    check_role_stage,
    load_contract,
    model_shape,
)
from distserve_worker.drain import Drain
from distserve_worker.model_source import SOURCE_KINDS, ModelSpec
from distserve_worker.settings import DecodeSettings, MiB, PrefillSettings, RouterSettings

ROLES = ("prefill", "decode", "router", "colocated")


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"DISTSERVE_{name}", default)


def _optional_int(name: str) -> int | None:
    value = os.environ.get(f"DISTSERVE_{name}")
    return int(value) if value else None


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
        "--stage",
        type=int,
        default=int(_env("STAGE", 0)),
        help="pipeline stage this process runs (the plan file gives its layers) [DISTSERVE_STAGE]",
    )
    s.add_argument(
        "--stage-addresses",
        default=_env("STAGE_ADDRESSES", ""),
        help="comma-separated gRPC addresses of every pipeline stage of this instance, stage 0 first; "
        "default: the plan file's stage address templates with this pod's ordinal "
        "[DISTSERVE_STAGE_ADDRESSES]",
    )
    s.add_argument(
        "--ordinal",
        type=int,
        default=int(_env("ORDINAL", -1)),
        help="this instance's StatefulSet ordinal, which fills the plan file's stage address templates; "
        "default: the number ending $POD_NAME [DISTSERVE_ORDINAL]",
    )
    s.add_argument(
        "--tp",
        type=int,
        default=int(_env("TP", 0)),
        help="tensor-parallel ranks of this instance, one device each; without --plan-file only "
        "(the plan file's tp otherwise) [DISTSERVE_TP]",
    )
    s.add_argument(
        "--rank-port-base",
        type=int,
        default=int(_env("RANK_PORT_BASE", -1)),
        help="follower rank r serves gRPC on this + r; 0 = free ports (local); default: the plan "
        "file's, or free ports [DISTSERVE_RANK_PORT_BASE]",
    )
    s.add_argument(
        "--decode-tp",
        type=int,
        default=int(_env("DECODE_TP", 0)),
        help="prefill: the decode instances' tp, whose head ranges each rank prepares its KV for; "
        "without --plan-file only (default: this instance's tp) [DISTSERVE_DECODE_TP]",
    )
    s.add_argument(
        "--drain-seconds",
        type=float,
        default=float(_env("DRAIN_SECONDS", 30)),
        help="after SIGTERM: refuse new requests at once (not ready), finish the ones held, exit; at "
        "most this long, then fail what is left and exit; 0: SIGTERM stops at once. Keep it below "
        "the pod's terminationGracePeriodSeconds [DISTSERVE_DRAIN_SECONDS]",
    )
    s.add_argument(
        "--max-chunk-mib",
        type=float,
        default=float(_env("MAX_CHUNK_MIB", 2)),
        help="KV chunk size [DISTSERVE_MAX_CHUNK_MIB]",
    )
    p = parser.add_argument_group("prefill")
    p.add_argument(
        "--token-budget",
        type=int,
        default=_optional_int("TOKEN_BUDGET"),
        help="padded prompt tokens per forward (default 2048; the plan file's otherwise) [DISTSERVE_TOKEN_BUDGET]",
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
    d.add_argument(
        "--max-batch",
        type=int,
        default=_optional_int("MAX_BATCH"),
        help="sequences per step (default 32; the plan file's otherwise) [DISTSERVE_MAX_BATCH]",
    )
    d.add_argument(
        "--max-kv-tokens",
        type=int,
        default=_optional_int("MAX_KV_TOKENS"),
        help="KV capacity in tokens (default 65536; the plan file's otherwise) [DISTSERVE_MAX_KV_TOKENS]",
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
    r.add_argument(
        "--max-queue",
        type=_at_least(0),
        default=_env("MAX_QUEUE", RouterSettings.max_queue),
        help="requests that may wait for an instance when all of a role are saturated (beyond the decode "
        "instances' free room); one more gets 503 with Retry-After (default %(default)s) [DISTSERVE_MAX_QUEUE]",
    )
    r.add_argument(
        "--queue-timeout-seconds",
        type=_at_least(1),
        default=_env("QUEUE_TIMEOUT_SECONDS", int(RouterSettings.queue_timeout_seconds)),
        help="longest a request waits for an instance of one role before a 503 with Retry-After "
        "(default %(default)s) [DISTSERVE_QUEUE_TIMEOUT_SECONDS]",
    )
    r.add_argument(
        "--api-key-file",
        default=_env("API_KEY_FILE", ""),
        help="clients must send 'Authorization: Bearer KEY' with a key from this file (one a line; re-read "
        "when it changes); /healthz, /readyz and /metrics stay open (default: no key) [DISTSERVE_API_KEY_FILE]",
    )


def _at_least(low: int) -> Any:
    """An argparse type: an integer >= low, refused with the reason otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Obeyed:
    """What a worker takes from the contract (or, without a plan file, from flags)."""

    model: ModelSpec
    ttft_millis: int = 0
    tpot_millis: int = 0
    tp: int = 1
    pp: int = 1
    stage: int = 0
    layers: tuple[int, int] | None = None
    stage_addresses: tuple[str, ...] = ()  # every stage of this instance, stage 0 first (pp > 1)
    rank_port_base: int = 0
    decode_tp: int = 1
    decode_layers: tuple[tuple[int, int], ...] = ()  # the decode stages' layer ranges (pp > 1)
    limits: EngineLimits = field(default_factory=EngineLimits)
    contract: RuntimeContract | None = None  # the plan file's, when there is one


def _limits_from_flags(args: argparse.Namespace) -> EngineLimits:
    given = {
        "prefill_token_budget": getattr(args, "token_budget", None),
        "decode_max_batch": getattr(args, "max_batch", None),
        "decode_kv_tokens": getattr(args, "max_kv_tokens", None),
    }
    return EngineLimits(**{k: v for k, v in given.items() if v is not None})


def obey(args: argparse.Namespace) -> Obeyed:
    """The contract this process runs under; ContractError (one line) when it cannot be obeyed."""
    if not args.plan_file:
        model = ModelSpec(args.model_name, args.model_source, args.model_path, args.dtype, args.gguf_file)
        tp = args.tp or 1
        if tp < 1 or tp > MAX_TP:
            raise ContractError(f"--tp {tp}: use 1 to {MAX_TP}")
        return Obeyed(
            model,
            args.slo_ttft_millis,
            args.slo_tpot_millis,
            tp=tp,
            stage=args.stage,
            rank_port_base=max(0, args.rank_port_base),
            decode_tp=args.decode_tp or tp,
            limits=_limits_from_flags(args),
        )
    contract = load_contract(args.plan_file)
    # The plan file is the single source: a flag that says otherwise is a mistake, not an override.
    clashes = [
        flag
        for flag, value in (
            ("--tp", args.tp),
            ("--decode-tp", args.decode_tp),
            ("--token-budget", args.token_budget),
            ("--max-batch", args.max_batch),
            ("--max-kv-tokens", args.max_kv_tokens),
        )
        if value
    ]
    if clashes:
        raise ContractError(
            f"{', '.join(clashes)} given together with --plan-file: the plan file sets them; drop the flag(s)"
        )
    role = args.role
    limits = contract.limits
    model = ModelSpec.from_plan_json(contract.model.to_wire())
    slo = contract.slo
    if role == "colocated" and contract.colocated is not None:  # mode Colocated: its own entry
        check_colocated(contract, args.stage)
        return Obeyed(model, slo.ttft_millis, slo.tpot_millis, limits=limits, contract=contract)
    if role not in ("prefill", "decode"):  # router, colocated: the model, SLOs and limits only
        return Obeyed(model, slo.ttft_millis, slo.tpot_millis, limits=limits)
    check_role_stage(contract, role, args.stage)
    phase = contract.phase(role)
    span = phase.stages[args.stage].layers
    base = args.rank_port_base if args.rank_port_base >= 0 else phase.rank_port_base
    return Obeyed(
        model,
        slo.ttft_millis,
        slo.tpot_millis,
        tp=phase.tp,
        pp=phase.pp,
        stage=args.stage,
        layers=(span.start, span.end),
        stage_addresses=stage_addresses(args, contract, role),
        rank_port_base=base,
        decode_tp=contract.decode.tp,
        decode_layers=tuple((st.layers.start, st.layers.end) for st in contract.decode.stages),
        limits=limits,
        contract=contract,
    )


def ordinal(args: argparse.Namespace) -> int:
    """This instance's StatefulSet ordinal: --ordinal, else the number ending the pod's name."""
    if args.ordinal >= 0:
        return int(args.ordinal)
    tail = os.environ.get("POD_NAME", "").rsplit("-", 1)[-1]
    if tail.isdigit():
        return int(tail)
    raise ContractError(
        "pipeline stages need this instance's ordinal to find their neighbours: give --ordinal "
        "(DISTSERVE_ORDINAL) or run in a StatefulSet pod (POD_NAME ends in it)"
    )


def stage_addresses(args: argparse.Namespace, contract: RuntimeContract, role: str) -> tuple[str, ...]:
    """Where every stage of this instance listens (pp > 1): --stage-addresses, else the contract's
    per-stage templates filled with this instance's ordinal."""
    phase = contract.phase(role)
    given = _split(args.stage_addresses)
    if given:
        if len(given) != phase.pp:
            raise ContractError(
                f"--stage-addresses lists {len(given)} addresses but {role}.pp is {phase.pp}: list one per stage"
            )
        return given
    if phase.pp == 1:
        return ()
    missing = [s.stage for s in phase.stages if not s.address]
    if missing:
        raise ContractError(
            f"plan file: {role}.stages[{missing[0]}].address is empty: pipeline stages find each other "
            "there (re-render the plan with the operator) or give --stage-addresses"
        )
    k = ordinal(args)
    return tuple(s.address.replace("{ordinal}", str(k)) for s in phase.stages)


def build_settings(
    args: argparse.Namespace, ob: Obeyed | None = None
) -> PrefillSettings | DecodeSettings | RouterSettings | ColocatedSettings:
    ob = ob or obey(args)
    model = ob.model
    ttft = args.slo_ttft_millis or ob.ttft_millis
    tpot = args.slo_tpot_millis or ob.tpot_millis
    limits = ob.limits
    chunk = int(args.max_chunk_mib * MiB)
    if args.drain_seconds < 0:
        raise ContractError(f"--drain-seconds {args.drain_seconds:g}: use 0 (SIGTERM stops at once) or more")
    common: dict[str, Any] = {
        "model": model,
        "host": args.host,
        "advertise": args.advertise,
        "instance": args.advertise,
    }
    common |= {"threads": args.threads, "max_chunk_bytes": chunk, "drain_seconds": args.drain_seconds}
    parallel: dict[str, Any] = {
        "tp": ob.tp,
        "pp": ob.pp,
        "stage": ob.stage,
        "layers": ob.layers,
        "stage_addresses": ob.stage_addresses,
        "rank_port_base": ob.rank_port_base,
    }
    prefill_limits: dict[str, Any] = {
        "token_budget": limits.prefill_token_budget,
        "kv_buffer_bytes": int(args.kv_buffer_mib * MiB),
        "kv_ttl_seconds": args.kv_ttl_seconds,
    }
    decode_limits: dict[str, Any] = {
        "max_batch": limits.decode_max_batch,
        "max_kv_tokens": limits.decode_kv_tokens,
    }
    if args.role == "colocated":
        if ob.tp != 1:
            raise ContractError("colocated: --tp must be 1 (the colocated baseline runs on one device)")
        port, http_port = args.port or 50051, args.http_port or 8081
        return ColocatedSettings(
            PrefillSettings(**common, port=port, http_port=http_port, **prefill_limits),
            DecodeSettings(**common, port=port, http_port=http_port, **decode_limits),
        )
    if args.role == "prefill":
        return PrefillSettings(
            **common,
            **parallel,
            port=args.port or 50051,
            http_port=args.http_port or 8081,
            decode_tp=ob.decode_tp,
            decode_layers=ob.decode_layers,
            **prefill_limits,
        )
    if args.role == "decode":
        return DecodeSettings(
            **common,
            **parallel,
            port=args.port or 50052,
            http_port=args.http_port or 8082,
            **decode_limits,
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
        max_queue=args.max_queue,
        queue_timeout_seconds=float(args.queue_timeout_seconds),
        api_key_file=args.api_key_file,
    )


def check_model(settings: PrefillSettings | DecodeSettings, contract: RuntimeContract | None) -> None:
    """Before loading weights: the model's own config fits what this process must run."""
    from distserve_worker.model_source import load_config
    from distserve_worker.pp.partial import PIPELINE_MODEL_TYPES
    from distserve_worker.tp.shard import SHARDABLE_MODEL_TYPES

    config = load_config(settings.model)
    model_type = getattr(config, "model_type", "")
    if settings.tp > 1 and model_type not in SHARDABLE_MODEL_TYPES:
        raise ContractError(
            f"tp {settings.tp}: tensor parallelism supports {', '.join(SHARDABLE_MODEL_TYPES)} models; this "
            f"one is {model_type!r}: run it with tp 1 (pin tp: 1 in spec.planner.pin)"
        )
    if settings.pp > 1 and model_type not in PIPELINE_MODEL_TYPES:
        raise ContractError(
            f"pp {settings.pp}: pipeline stages support {', '.join(PIPELINE_MODEL_TYPES)} models; this one "
            f"is {model_type!r}: run it with pp 1 (pin pp: 1 in spec.planner.pin)"
        )
    if contract is not None:
        check_against_model(
            contract, "prefill" if isinstance(settings, PrefillSettings) else "decode", settings.stage, config
        )
        return
    _, heads, kv_heads = model_shape(config)
    reason = tp_refusal(heads, kv_heads, settings.tp)
    if reason:
        raise ContractError(f"--tp: {reason}")
    if isinstance(settings, PrefillSettings) and settings.decode_tp != settings.tp:
        reason = tp_refusal(heads, kv_heads, settings.decode_tp)
        if reason:
            raise ContractError(f"--decode-tp: {reason}")


async def _serve(settings: PrefillSettings | DecodeSettings | RouterSettings | ColocatedSettings) -> None:
    drain: Drain | None = None
    if isinstance(settings, ColocatedSettings):
        from distserve_worker.colocated import serve_colocated

        drain = Drain(settings.prefill.drain_seconds)
        coro = serve_colocated(settings, drain=drain)
    elif isinstance(settings, PrefillSettings):
        from distserve_worker.prefill import serve_prefill

        drain = Drain(settings.drain_seconds)
        coro = serve_prefill(settings, drain=drain)
    elif isinstance(settings, DecodeSettings):
        from distserve_worker.decode import serve_decode

        drain = Drain(settings.drain_seconds)
        coro = serve_decode(settings, drain=drain)
    else:
        from distserve_worker.router.app import serve_router

        coro = serve_router(settings)
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        # The kubelet (scale-down, rollout, node drain) or `distserve up` shutting down: a prefill,
        # decode or colocated process drains (drain.py); the router, or a second SIGTERM, stops now.
        if drain is None or not drain.start():
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, task.cancel)  # Ctrl-C: stop serving at once
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(args: argparse.Namespace) -> int:
    try:
        obeyed = obey(args)  # the plan file is read once
        settings = build_settings(args, obeyed)
        if isinstance(settings, (PrefillSettings, DecodeSettings)):
            check_model(settings, obeyed.contract)
    except ContractError as exc:
        # One line naming the field and the fix, before any weights are read.
        print(f"distserve worker {args.role}: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.role != "router":
        from distserve_worker.kvtransfer.memory import keep_freed_memory

        # Before any tensor exists: per-step tensors and KV chunks are then reused warm for the
        # life of the process (see kvtransfer/memory.py); `distserve profile` does the same.
        keep_freed_memory(int(args.max_chunk_mib * MiB))
    asyncio.run(_serve(settings))
    if getattr(settings, "tp", 1) > 1:
        # A process group was joined: leave without gloo's/NCCL's C++ destructors, which can abort a
        # process at interpreter exit after a clean shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distserve_worker.cli_worker ROLE ...`: the same as `distserve worker ROLE ...`."""
    parser = argparse.ArgumentParser(prog="distserve worker", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
