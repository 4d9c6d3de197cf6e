"""`distserve simulate -f MANIFEST --prefill 2x1 --decode 1x1 [--rate R] [--plot FILE]`: one
configuration, one rate.

`--prefill TPxPP[:REPLICAS]`, `--decode TPxPP[:REPLICAS]`, or `--colocated TPxPP[:REPLICAS]`;
`--plot` draws the TTFT and TPOT distributions against the SLO into a .png or .svg file.
Exit 0 with the figures, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from distserve_operator import api

from .pin import PhaseChoice

_CONFIG = re.compile(r"^(?:tp)?(\d+)(?:x(?:pp)?(\d+))?(?::(\d+))?$", re.IGNORECASE)


def parse_choice(text: str) -> PhaseChoice:
    m = _CONFIG.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not TPxPP[:REPLICAS], e.g. 2x1 or 2x1:3")
    return PhaseChoice(int(m[1]), int(m[2] or 1), int(m[3] or 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="manifest holding a DistServeDeployment")
    parser.add_argument("--prefill", help="prefill TPxPP[:REPLICAS], e.g. 2x1")
    parser.add_argument("--decode", help="decode TPxPP[:REPLICAS], e.g. 1x1:2")
    parser.add_argument("--colocated", help="one instance does both phases: TPxPP[:REPLICAS]")
    parser.add_argument("--rate", type=float, help="requests/s (default: the manifest's)")
    parser.add_argument(
        "--profile", help="latency profile replacing spec.planner.profile: a file or a bundled name"
    )
    parser.add_argument("--trace", help="CSV with input_tokens,output_tokens columns")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="also draw the TTFT and TPOT distributions against the SLO into FILE.png or FILE.svg "
        "(needs the plot extra: pip install 'distserve[plot]')",
    )


def run(args: argparse.Namespace) -> int:
    from .core import simulate_configuration
    from .loaders.spec import plan_input

    if args.plot:
        from .plots import plot_arg_ok

        if not plot_arg_ok(args.plot):  # before any work: a bad --plot fails at once
            return 2
    try:
        dsd = api.load_manifest(args.filename)
        inp = plan_input(dsd.spec, profile=args.profile, trace=args.trace)
        rate = args.rate if args.rate is not None else inp.workload.rate
        if rate <= 0:
            raise ValueError("--rate must be above 0")
        simulated = simulate_configuration(
            inp,
            rate,
            prefill=parse_choice(args.prefill) if args.prefill else None,
            decode=parse_choice(args.decode) if args.decode else None,
            colocated_choice=parse_choice(args.colocated) if args.colocated else None,
        )
    except api.SpecError as exc:
        print(exc.report(args.filename), file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"cannot simulate: {exc}", file=sys.stderr)
        return 2
    result = simulated.summary(inp.slo)
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    if args.plot:
        from .plots import draw_latencies

        written = draw_latencies(simulated, inp.slo, inp.architecture.name, inp.device.name, args.plot)
        print(f"  plot: {written}", file=sys.stderr)
    return 0
