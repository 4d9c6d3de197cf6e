"""`distserve operator`: run the kopf operator.

Our own settings are flags here (or `DISTSERVE_OPERATOR_*` variables); every other flag goes to
`kopf run` untouched: `--namespace NS` (repeatable), `--all-namespaces`, `--standalone`,
`--liveness http://0.0.0.0:8080/healthz`, `--peering`, `--verbose`, `--debug`, `--log-format`.
"""

from __future__ import annotations

import argparse
from typing import Any

from .settings import OperatorSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fields = OperatorSettings.model_fields
    parser.epilog = (
        "Other flags are passed to `kopf run` (e.g. --namespace, --all-namespaces, --standalone, --liveness)."
    )
    parser.add_argument("--metrics-port", type=int, help=fields["metrics_port"].description)
    parser.add_argument("--planner-workers", type=int, help=fields["planner_workers"].description)
    parser.add_argument("--planner-processes", type=int, help=fields["planner_processes"].description)
    parser.add_argument("--plan-cache-size", type=int, help=fields["plan_cache_size"].description)
    parser.add_argument("--resync-seconds", type=float, help=fields["resync_seconds"].description)
    parser.add_argument("--router-metrics-url", help=fields["router_metrics_url"].description)
    parser.add_argument("--api-server", help=fields["api_server"].description)


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    overrides: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "metrics_port",
            "planner_workers",
            "planner_processes",
            "plan_cache_size",
            "resync_seconds",
            "router_metrics_url",
            "api_server",
        )
    }
    return OperatorSettings.from_env(**overrides)


def run(args: argparse.Namespace) -> int:
    import kopf
    from kopf import cli as kopf_cli

    from .handlers import register

    settings = settings_from_args(args)
    registry = register(kopf.OperatorRegistry(), settings)
    extra = list(getattr(args, "extra", []) or [])
    controls = kopf_cli.CLIControls(registry=registry)
    try:
        kopf_cli.main.main(
            args=["run", *extra], obj=controls, prog_name="distserve operator", standalone_mode=False
        )
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
