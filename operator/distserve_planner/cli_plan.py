"""`distserve plan -f MANIFEST [--profile FILE|NAME] [--trace CSV] [-o table|json] [--plot FILE]`.

Exit status: 0 when a report is printed, including an infeasible SLO (the report says so, with the
closest candidate and the fix: it is an answer, not a failure); 2 when the input is bad (invalid
manifest, unknown model, unreadable profile or trace, a --plot that cannot be drawn), with one
line per problem on stderr.
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
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw SLO attainment against request rate for the top plans and the colocated "
        "alternative, into FILE.png or FILE.svg (needs the plot extra: pip install 'distserve[plot]')",
    )


def progress_printer(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None

    def say(message: str) -> None:
        print(f"  planning: {message}", file=sys.stderr, flush=True)

    return say


def run(args: argparse.Namespace) -> int:
    from .core import plan
    from .loaders.spec import plan_input

    if args.plot:
        from .plots import plot_arg_ok

        if not plot_arg_ok(args.plot):  # before any work: a bad --plot fails at once
            return 2
    try:
        dsd = api.load_manifest(args.filename)
        inp = plan_input(
            dsd.spec,
            profile=args.profile,
            trace=args.trace,
            rate_override=args.rate,
            colocated_profile=args.colocated_profile,
        )
        report = plan(inp, progress=progress_printer(args.quiet))
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
    if args.plot:
        from .curves import attainment_curves
        from .plots import draw_attainment

        written = draw_attainment(attainment_curves(inp, report), args.plot)
        if not args.quiet:
            print(f"  plot: {written}", file=sys.stderr)
    return 0
