"""The `distserve` command.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their subcommand runs, so `distserve plan` never imports torch
and `distserve operator` never imports transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Order is the order shown in --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": (
        "distserve_planner.cli_plan",
        "choose prefill/decode parallelism and replicas for a manifest",
    ),
    "simulate": ("distserve_planner.cli_simulate", "simulate one configuration under a workload"),
    "up": ("distserve_worker.local.cli_up", "run router, prefill and decode locally for a manifest"),
    "demo": ("distserve_worker.local.cli_demo", "start the local stack on SmolLM2, send requests, stop"),
    "profile": ("distserve_worker.profiling.cli_profile", "profile real workers and fit the latency model"),
    "operator": ("distserve_operator.cli_operator", "run the kopf operator (extra flags go to `kopf run`)"),
    "cache": ("distserve_worker.cli_cache", "list or prune the de-quantized model copies in the cache"),
    "worker": ("distserve_worker.cli_worker", "run one worker or router process (used inside pods)"),
}


def _load(name: str):  # type: ignore[no-untyped-def]
    module_name, _ = SUBCOMMANDS[name]
    return importlib.import_module(module_name)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distserve", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (and only it needs its arguments).
        if name == chosen:
            _load(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    if args_list and args_list[0] == "operator":
        # kopf run flags pass through untouched.
        args, extra = parser.parse_known_args(args_list)
        args.extra = extra
    else:
        args = parser.parse_args(args_list)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
