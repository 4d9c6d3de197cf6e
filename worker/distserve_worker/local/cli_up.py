"""`distserve up -f MANIFEST`: plan the manifest and run router, prefill and decode locally.

Each role runs as its own process (the same `distserve worker ...` command a pod runs), with real
gRPC between them on loopback. Replica counts come from the planner; on a small machine they are
capped (`--max-replicas`) because every instance loads its own copy of the model.
"""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec


@dataclass(frozen=True)
class LocalPlan:
    name: str
    model: ModelSpec
    prefill: int
    decode: int
    slo_millis: tuple[int, int]
    attainment_percent: float
    summary: str


def plan_manifest(path: str | Path) -> LocalPlan:
    """Read the manifest and plan it with the operator's own planner (same code as in the cluster)."""
    from distserve_operator.api import load_manifest
    from distserve_operator.planner import plan_deployment

    dsd = load_manifest(path)
    report = plan_deployment(dsd)
    slo = dsd.spec.slo
    return LocalPlan(
        name=dsd.metadata.name,
        model=ModelSpec.from_api(dsd.spec.model),
        prefill=report.plan.prefill.replicas,
        decode=report.plan.decode.replicas,
        slo_millis=(slo.ttft_millis, slo.tpot_millis),
        attainment_percent=float(slo.attainment_percent),
        summary=report.table(),
    )


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


def start_stack(plan: LocalPlan, port: int, max_replicas: int, threads: int, log_dir: str = "") -> LocalStack:
    prefill, decode = min(plan.prefill, max_replicas), min(plan.decode, max_replicas)
    if (prefill, decode) != (plan.prefill, plan.decode):
        print(
            f"plan asks for {plan.prefill} prefill + {plan.decode} decode instances; "
            f"running {prefill} + {decode} here (--max-replicas {max_replicas})"
        )
    return LocalStack(
        StackConfig(
            plan.model,
            prefill=max(1, prefill),
            decode=max(1, decode),
            threads=threads,
            router_port=port,
            log_dir=Path(log_dir) if log_dir else None,
            slo_millis=plan.slo_millis,
        )
    )


def wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def run(args: argparse.Namespace) -> int:
    plan = plan_manifest(args.file)
    print(plan.summary)
    stack = start_stack(plan, args.port, args.max_replicas, args.threads, args.log_dir)
    print(f"\nstarting {plan.name}: logs in {stack.log_dir}")
    stack.start()
    try:
        stack.wait_ready(timeout=600)
        print(f"\n{plan.name} is serving {plan.model.name} at {stack.url}  (OpenAI API: {stack.url}/v1)")
        print(
            f"  try: curl {stack.url}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{plan.model.name}", "messages": [{{"role": "user", "content": "Hi"}}]}}\''
        )
        print("  Ctrl-C stops it.")
        wait_for_interrupt()
        print("\nstopping ...")
    finally:
        stack.stop()
    print("stopped.")
    return 0
