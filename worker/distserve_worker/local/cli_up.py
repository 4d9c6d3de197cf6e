"""`distserve up -f MANIFEST`: plan the manifest and run router, prefill and decode locally.

Each role runs as its own process (the same `distserve worker ...` command a pod runs), with real
gRPC between them on loopback. What runs is what the plan says, through the same runtime contract
a pod gets: the plan (the planner's choice, or the user's `spec.planner.pin`) becomes a
`RuntimeContract` written to `<log dir>/plan.json`, and every process starts with `--plan-file`
(its role's tp, the layers, the engine limits, the model and the SLO). A plan in mode Colocated
(spec.serving.mode) runs colocated processes instead, each doing both phases, behind the same router. Replica counts are capped
(`--max-replicas`) because on a small machine every instance loads its own copy of the model.
An instance with pipeline stages (pp > 1) runs as pp processes, one per stage, each holding its
layers of the contract's split; stage 0 is the one the router calls.
Once the stack is up, the router's `GET /v1/distserve/instances` is printed as a table.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distserve_worker.local.stack import LocalStack, StackConfig, write_plan
from distserve_worker.local.topology import fetch_topology, format_topology
from distserve_worker.model_source import ModelSpec
from distserve_worker.router.auth import read_keys

# The ports a pod uses (cli_worker's defaults); local processes get free ones with --port/--http-port.
PREFILL_PORTS = (50051, 8081)
DECODE_PORTS = (50052, 8082)


class PlanNotRunnable(ValueError):
    """The plan cannot run locally; the message says why and what to change."""


@dataclass(frozen=True)
class LocalPlan:
    name: str
    model: ModelSpec
    prefill: int
    decode: int
    slo_millis: tuple[int, int]
    attainment_percent: float
    summary: str
    prefill_tp: int = 1
    decode_tp: int = 1
    prefill_pp: int = 1
    decode_pp: int = 1
    colocated: int = 0  # mode Colocated: the colocated instances planned (prefill/decode unused)
    # From the manifest and the planner (distserve_operator.api objects); without them (a built-in
    # plan) the stack runs from model flags instead of a contract.
    api_model: Any = None  # api.ModelSpec
    api_slo: Any = None  # api.Slo
    status: Any = None  # api.PlanStatus
    limits: Any = None  # api.EngineLimits


def plan_manifest(path: str | Path) -> LocalPlan:
    """Read the manifest and plan it with the operator's own planner (same code as in the cluster)."""
    from distserve_operator import api
    from distserve_operator.api import load_manifest
    from distserve_planner import plan_deployment

    dsd = load_manifest(path)
    report = plan_deployment(dsd)
    slo = dsd.spec.slo
    plan = report.plan
    return LocalPlan(
        name=dsd.metadata.name,
        model=ModelSpec.from_api(dsd.spec.model),
        prefill=plan.prefill.replicas,
        decode=plan.decode.replicas,
        slo_millis=(slo.ttft_millis, slo.tpot_millis),
        attainment_percent=float(slo.attainment_percent),
        summary=report.table(),
        prefill_tp=plan.prefill.tp,
        decode_tp=plan.decode.tp,
        prefill_pp=plan.prefill.pp,
        decode_pp=plan.decode.pp,
        colocated=plan.colocated.replicas if plan.mode is api.PlanMode.COLOCATED and plan.colocated else 0,
        api_model=dsd.spec.model,
        api_slo=slo,
        status=plan,
        limits=plan.limits,  # what the planner simulated; build_contract falls back to defaults
    )


def build_contract(plan: LocalPlan, prefill: int, decode: int, colocated: int = 0) -> Any:
    """The RuntimeContract that runs `plan` with these replica counts (`colocated`: of colocated
    instances, for a plan in mode Colocated); PlanNotRunnable otherwise."""
    from pydantic import ValidationError

    from distserve_operator import api
    from distserve_operator.contract import assemble
    from distserve_worker.contract import ContractError, first_error, model_shape
    from distserve_worker.model_source import load_config

    try:
        layers, heads, kv_heads = model_shape(load_config(plan.model))
    except ContractError as exc:
        raise PlanNotRunnable(f"model {plan.model.name}: {exc}") from exc
    try:
        # The operator's own assembly, with this machine's replica counts and the pods' ports.
        return assemble(
            plan.api_model,
            plan.api_slo,
            plan.status,
            api.ModelShape(layers=layers, heads=heads, kv_heads=kv_heads),
            plan.limits or api.EngineLimits(),
            ports={"prefill": PREFILL_PORTS, "decode": DECODE_PORTS},
            phases={
                "prefill": (plan.prefill_tp, plan.prefill_pp, prefill),
                "decode": (plan.decode_tp, plan.decode_pp, decode),
                **(_colocated_phase(plan, colocated) if colocated else {}),
            },
        )
    except ValidationError as exc:
        raise PlanNotRunnable(
            f"the plan cannot run on {plan.model.name}: {first_error(exc)}; "
            "pin a parallelism that fits with spec.planner.pin"
        ) from exc
    except ValueError as exc:  # e.g. more stages than the model has layers
        raise PlanNotRunnable(
            f"the plan cannot run on {plan.model.name}: {exc}; pin a parallelism that fits with spec.planner.pin"
        ) from exc


def _colocated_phase(plan: LocalPlan, replicas: int) -> dict[str, tuple[int, int, int]]:
    c = plan.status.colocated
    return {"colocated": (c.tp, c.pp, replicas)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--file", required=True, help="DistServeDeployment manifest (YAML)")
    parser.add_argument("--port", type=int, default=8000, help="router HTTP port (0 = any free port)")
    parser.add_argument(
        "--max-replicas",
        type=int,
        default=1,
        help="cap on instances per role (each loads the model; the plan may ask for more than fits here)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0 = half the cores)"
    )
    parser.add_argument("--log-dir", default="", help="where the processes' logs go (default: a temp dir)")
    parser.add_argument(
        "--api-key-file",
        default="",
        help="the router asks clients for 'Authorization: Bearer KEY' with a key from this file (one a line, "
        "re-read when it changes; default: no key)",
    )


def start_stack(
    plan: LocalPlan, port: int, max_replicas: int, threads: int, log_dir: str = "", api_key_file: str = ""
) -> LocalStack:
    """The stack that runs `plan` (not started yet). With the manifest's model and the plan, it runs
    through a contract written to `<log dir>/plan.json`; a built-in plan runs from model flags.
    With `api_key_file`, the router asks for a key from it. PlanNotRunnable when the plan cannot run here."""
    router_args = _api_key_args(api_key_file)
    if plan.colocated:
        return _colocated_stack(plan, port, max_replicas, threads, log_dir, router_args)
    prefill, decode = max(1, min(plan.prefill, max_replicas)), max(1, min(plan.decode, max_replicas))
    if (prefill, decode) != (plan.prefill, plan.decode):
        print(
            f"plan asks for {plan.prefill} prefill + {plan.decode} decode instances; "
            f"running {prefill} + {decode} here (--max-replicas {max_replicas})"
        )
    directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="distserve-"))
    common: dict[str, Any] = {
        "prefill": prefill,
        "decode": decode,
        "threads": threads,
        "router_port": port,
        "log_dir": directory,
        "router_args": router_args,
    }
    if plan.api_model is None or plan.api_slo is None:
        return LocalStack(StackConfig(plan.model, slo_millis=plan.slo_millis, **common))
    plan_file = write_plan(build_contract(plan, prefill, decode), directory)
    return LocalStack(StackConfig(plan.model, plan_file=plan_file, **common))


def _api_key_args(api_key_file: str) -> list[str]:
    """The router's flag for the key file, checked here so a wrong path fails before anything starts."""
    if not api_key_file:
        return []
    path = Path(api_key_file).resolve()
    if not path.is_file():
        raise OSError(f"--api-key-file {api_key_file}: no such file")
    return ["--api-key-file", str(path)]


def _colocated_stack(
    plan: LocalPlan, port: int, max_replicas: int, threads: int, log_dir: str, router_args: list[str]
) -> LocalStack:
    """Mode Colocated: colocated processes (each both phases) through the plan's contract."""
    n = max(1, min(plan.colocated, max_replicas))
    if n != plan.colocated:
        print(
            f"plan asks for {plan.colocated} colocated instances; running {n} here (--max-replicas {max_replicas})"
        )
    directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="distserve-"))
    plan_file = write_plan(build_contract(plan, n, n, colocated=n), directory)
    config = StackConfig(
        plan.model,
        colocated=n,
        threads=threads,
        router_port=port,
        log_dir=directory,
        plan_file=plan_file,
        router_args=router_args,
    )
    return LocalStack(config)


def describe(plan: LocalPlan, stack: LocalStack) -> str:
    c = stack.config
    how = "from its plan file" if c.plan_file else "from model flags"
    if c.colocated:
        shape = plan.status.colocated
        return f"{c.colocated} colocated instance(s) (prefill and decode in each) at TP{shape.tp}xPP{shape.pp}, {how}"
    return (
        f"{c.prefill} prefill instance(s) at TP{plan.prefill_tp}xPP{plan.prefill_pp} + {c.decode} decode "
        f"instance(s) at TP{plan.decode_tp}xPP{plan.decode_pp}, {how}"
    )


def wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def print_topology(stack: LocalStack, timeout: float = 30.0, api_key_file: str = "") -> None:
    expect = stack.config.colocated or stack.config.prefill + stack.config.decode
    try:
        # The first key in the file, if the router asks for one.
        keys = read_keys(Path(api_key_file)) if api_key_file else ()
        api_key = keys[0].decode() if keys else ""
        doc = fetch_topology(stack.url, expect=expect, timeout=timeout, api_key=api_key)
        print(format_topology(doc))
    except OSError as exc:
        print(f"(topology unavailable: {exc})")


def run(args: argparse.Namespace) -> int:
    from distserve_operator.api import SpecError

    try:
        plan = plan_manifest(args.file)
    except SpecError as exc:  # the manifest itself: one line per problem
        print(exc.report(args.file), file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # e.g. a pin that cannot run, an unknown model
        print(f"distserve up: {args.file}: cannot plan: {exc}", file=sys.stderr)
        return 2
    print(plan.summary)
    try:
        stack = start_stack(plan, args.port, args.max_replicas, args.threads, args.log_dir, args.api_key_file)
    except (PlanNotRunnable, OSError) as exc:
        print(f"distserve up: {exc}", file=sys.stderr)
        return 2
    print(f"\nstarting {plan.name}: {describe(plan, stack)}; plan file and logs in {stack.log_dir}")
    stack.start()
    try:
        stack.wait_ready(timeout=600)
        print(f"\n{plan.name} is up:")
        print_topology(stack, api_key_file=args.api_key_file)
        print(f"\n{plan.name} is serving {plan.model.name} at {stack.url}  (OpenAI API: {stack.url}/v1)")
        auth = " -H 'Authorization: Bearer <a key from the key file>'" if args.api_key_file else ""
        print(
            f"  try: curl {stack.url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{plan.model.name}", "messages": [{{"role": "user", "content": "Hi"}}]}}\''
        )
        print(f"  topology: curl{auth} {stack.url}/v1/distserve/instances")
        print("  Ctrl-C stops it.", flush=True)
        wait_for_interrupt()
        print("\nstopping ...")
    finally:
        stack.stop()
    print("stopped.")
    return 0
