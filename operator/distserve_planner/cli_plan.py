"""`distserve plan -f MANIFEST [--profile FILE|NAME] [--trace CSV] [-o table|json]`.

Exit status: 0 when a report is printed, including an infeasible SLO (the report says so, with the
closest candidate and the fix: it is an answer, not a failure); 2 when the input is bad (invalid
manifest, unknown model, unreadable profile or trace), with one line per problem on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from distserve_operator import api


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="manifest holding a DistServeDeployment")
    parser.add_argument(
        "--profile",
        help="latency profile, replacing spec.planner.profile: a distserve-profile/v1 file, a DistServe "
        "profiler JSON, or a bundled profile's name (deploy/profiles/, e.g. opt-13b-a100-80gb-distserve)",
    )
    parser.add_argument(
        "--colocated-profile",
        help="profile for the colocated baseline, file or bundled name (the paper's: opt-13b-a100-80gb-vllm)",
    )
    parser.add_argument("--trace", help="CSV with input_tokens,output_tokens columns: lengths to simulate")
    parser.add_argument("--rate", type=float, help="plan for this many requests/s instead of the manifest's")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def progress_printer(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None

    def say(message: str) -> None:
        print(f"  planning: {message}", file=sys.stderr, flush=True)

    return say


def run(args: argparse.Namespace) -> int:
    from . import plan_deployment

    try:
        dsd = api.load_manifest(args.filename)
        report = plan_deployment(
            dsd,
            profile=args.profile,
            trace=args.trace,
            progress=progress_printer(args.quiet),
            rate_override=args.rate,
            colocated_profile=args.colocated_profile,
        )
    except api.SpecError as exc:
        print(exc.report(args.filename), file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"{args.filename}: cannot plan: {exc}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(report.table())
    return 0
