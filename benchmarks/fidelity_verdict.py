"""Does disaggregation pay? For two workloads and the same core budget (2 worker processes of one
torch thread each), the planner's verdict from the measured CPU profile against what the real
stack measures: 1 prefill + 1 decode process vs 2 colocated processes (`distserve worker colocated`).

    .venv/bin/python benchmarks/fidelity_verdict.py [--requests 20] [--json benchmarks/results/verdict.json]

Per workload and configuration: the simulator's goodput (bisection) and SLO attainment at two
rates around it, measured on the real stack with the same requests; measured goodput is where
attainment crosses the target between them (or a bound when it does not cross). The verdict is
the configuration with the higher goodput on the same 2 cores.
A PNG of predicted and measured attainment against the rate is drawn beside the JSON
(`plot_fidelity.py`, which redraws it from the JSON alone; needs the plot extra).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_model import ModelSide, Predicted, goodput, interpolated_goodput
from fidelity_stack import RateRun, measure_rates
from plot_fidelity import draw_next_to

from distserve_operator import api
from distserve_planner import simulator as sim
from distserve_planner.latency import InstanceTiming, PhaseCoefficients
from distserve_planner.workload import Lengths, Requests, generate
from distserve_worker.local.stack import StackConfig
from distserve_worker.model_source import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
# (prompt tokens, output tokens, TTFT SLO ms, TPOT SLO ms). Each workload has SLOs of its own, as
# DistServe's applications do, chosen so that the planner's verdict holds when the whole profile
# is 10% faster or slower (the spread of two in-stack profiles of this VM): a verdict that flips
# inside the model's own error cannot be checked by a measurement. The planner's goodputs,
# disaggregated / colocated, at profile x0.9, x1.0, x1.1:
# - 16/64 at TPOT 200 ms (the previous choice): 2.95/3.98, 2.20/1.71, 1.01/1.43. The step at
#   16-32 rows costs 150-210 ms, so TPOT sits at the SLO at every batch size and a 10% change
#   moves the goodput 2x and flips the verdict; measured TPOT p90 at one rate was 200 in one run
#   and 217 in the next. At 300 ms: 4.24/5.77, 3.46/5.09, 2.90/4.53.
# - 256/4 at TTFT 5 s: 2.15/1.88, 1.87/1.69, 1.58/1.50, within 10% and measured 3-4% apart either
#   way in two runs. At 8 s: 2.41/1.88, 2.12/1.69, 1.89/1.50.
# Those colocated figures assumed a prefill-first engine. Modelled as our colocated worker runs
# (issue 15: one FIFO forward thread), at the chosen SLOs: 16/64 4.24/14.06, 3.46/7.61, 2.90/5.68;
# 256/4 2.41/2.14, 2.12/1.86, 1.89/1.60. Both verdicts still hold across the 10%.
# With the manifest's loose 800 ms TPOT, 100 short-prompt requests pass even as a single burst
# (waiting for a decode slot spreads over 63 tokens), so that goodput has no upper end to measure.
WORKLOADS = {
    "short prompts, long outputs": (16, 64, 2000.0, 300.0),
    "long prompts, short outputs": (256, 4, 8000.0, 800.0),
}
EXTENSIONS = 3  # extra rates, each STEP_UP beyond the last, until attainment crosses the target
STEP_UP = 1.6
FACTORS = (0.7, 1.3)
DISAGGREGATED, COLOCATED = "disaggregated 1P+1D", "colocated x2"  # on the same 2 cores
BRACKET = 0.10  # bisect a measured goodput's bracket down to this relative width


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-f", "--filename", default=str(ROOT / "benchmarks/fidelity-smollm2.yaml"))
    parser.add_argument("--profile", default=str(ROOT / "deploy/profiles/smollm2-135m-cpu.json"))
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--only", choices=list(WORKLOADS), help="one workload")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/verdict.json"))
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="re-scale the profile to each workload's own in-stack forwards first (about 3 min each)",
    )
    parser.add_argument(
        "--bisections", type=int, default=2, help="extra rates per configuration to narrow down its goodput"
    )
    args = parser.parse_args()
    spec = api.load_manifest(args.filename).spec
    target = spec.slo.attainment_percent / 100
    side = ModelSide.load(args.profile, spec)
    model = ModelSpec.from_api(spec.model)
    started = time.perf_counter()
    out = []
    for name, (prompt, output, ttft_slo, tpot_slo) in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        reqs = generate(args.requests, args.seed, Lengths(prompt), Lengths(output))
        profiled = side
        entry_calibration: dict[str, object] | None = None
        if args.calibrate:
            profiled, entry_calibration = calibrated(side, model, Lengths(prompt), Lengths(output))
        engine_args = {"prefill_args": side.engine.prefill_args(), "decode_args": side.engine.decode_args()}
        configs = {
            DISAGGREGATED: StackConfig(model, prefill=1, decode=1, threads=1, **engine_args),
            COLOCATED: StackConfig(model, colocated=2, threads=1, **engine_args),
        }
        entry: dict[str, object] = {
            "workload": name,
            "inputTokens": prompt,
            "outputTokens": output,
            "slo": {"ttftMillis": ttft_slo, "tpotMillis": tpot_slo, "attainmentPercent": 100 * target},
        }
        if entry_calibration is not None:
            entry["calibration"] = entry_calibration
        for label, config in configs.items():
            # The predicted goodput is on exactly the requests measured (100 by default: enough
            # that a fast rate is not one burst), as in the fidelity benchmark.
            predict = predictor(profiled, label, reqs)
            g = goodput(lambda r, p=predict, a=ttft_slo, b=tpot_slo: p(r).attainment(a, b), target, high=50.0)
            rates = [round(max(g, 0.05) * k, 3) for k in FACTORS]
            _, runs = measure_rates(config, reqs, rates, args.seed, f"{name} / {label}")
            series = Series(config, reqs, args.seed, f"{name} / {label}", rates, runs)

            # Until the measured attainment crosses the target somewhere: a config that meets it at
            # every rate tried has a goodput "at least" that, which decides no verdict.
            for _ in range(EXTENSIONS):
                passed = [_attained(run, ttft_slo, tpot_slo, target) for run in runs]
                if all(passed):
                    more = round(rates[-1] * STEP_UP, 3)
                elif not any(passed):
                    more = round(rates[0] / STEP_UP, 3)
                else:
                    break
                series.add(more, "extending")
            # Attainment can sit near the target over a wide range of rates (TPOT close to its SLO
            # at every batch size), so a line between two rates 1.9x apart says little about where it
            # crosses: halve the bracket, as the fidelity benchmark does.
            for _ in range(args.bisections):
                passed = [_attained(run, ttft_slo, tpot_slo, target) for run in runs]
                ok = [r for r, p in zip(rates, passed, strict=True) if p]
                bad = [r for r, p in zip(rates, passed, strict=True) if not p and ok and r > max(ok)]
                if not ok or not bad or min(bad) / max(ok) - 1 <= BRACKET:
                    break
                series.add(round((max(ok) + min(bad)) / 2, 3), "bisecting")
            rows = []
            for rate, run in zip(rates, runs, strict=True):
                meas = run.results
                m_att = _attainment(run, ttft_slo, tpot_slo)
                rows.append(
                    {
                        "rate": rate,
                        "attainmentPercent": {
                            "predicted": round(100 * predict(rate).attainment(ttft_slo, tpot_slo), 1),
                            "measured": round(100 * m_att, 1),
                        },
                        "ttftP90Millis": round(sim.percentile([m.ttft_ms for m in meas], 90), 1),
                        "tpotP90Millis": round(sim.percentile([m.tpot_ms for m in meas], 90), 1),
                    }
                    | run.describe()
                )
            measured_att = [r["attainmentPercent"]["measured"] / 100 for r in rows]  # type: ignore[index]
            crossing = interpolated_goodput(rates, measured_att, target)
            if crossing is not None:
                measured: dict[str, object] = {"goodput": round(crossing, 3)}
            elif min(measured_att) >= target:
                measured = {"goodputAtLeast": rates[-1]}
            else:
                measured = {"goodputBelow": rates[0]}
            if args.calibrate:
                plain = predictor(side, label, reqs)
                g_plain = goodput(
                    lambda r, p=plain, a=ttft_slo, b=tpot_slo: p(r).attainment(a, b), target, high=50.0
                )
                uncalibrated_goodput: dict[str, object] = {"predictedGoodputUncalibrated": round(g_plain, 3)}
            else:
                uncalibrated_goodput = {}
            entry[label] = {
                "predictedGoodput": round(g, 3),
                **uncalibrated_goodput,
                "measured": measured,
                "rates": rows,
            }
        entry["verdict"] = verdict(entry)
        out.append(entry)
        print(json.dumps(entry["verdict"]), file=sys.stderr)
    result = {
        "benchmark": "does disaggregation pay",
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "cpus": os.cpu_count(),
        "profile": os.path.relpath(args.profile, ROOT),
        "requestsPerRate": args.requests,
        "workloads": out,
        "benchmarkSeconds": round(time.perf_counter() - started, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    draw_next_to(args.json)  # the PNG beside it (plot_fidelity.py redraws it from the JSON alone)
    print(json.dumps([w["verdict"] for w in out], indent=2))
    return 0


def predictor(side: ModelSide, label: str, reqs: Requests) -> Callable[[float], Predicted]:
    """The simulator's outcome of `reqs` at a rate, for one of the two configurations."""
    ins, outs = list(reqs.inputs), list(reqs.outputs)
    if label == DISAGGREGATED:
        return lambda rate: side.disaggregated(1, 1, reqs.arrivals(rate), ins, outs)
    return lambda rate: side.colocated(2, reqs.arrivals(rate), ins, outs)


@dataclass
class Series:
    """The rates measured for one configuration so far, kept in rate order (the caller's lists,
    updated in place)."""

    config: StackConfig
    reqs: Requests
    seed: int
    label: str
    rates: list[float]
    runs: list[RateRun]

    def add(self, rate: float, why: str) -> None:
        _, extra = measure_rates(self.config, self.reqs, [rate], self.seed, f"{self.label} ({why})")
        pairs = sorted([*zip(self.rates, self.runs, strict=True), (rate, extra[0])], key=lambda p: p[0])
        self.rates[:] = [r for r, _ in pairs]
        self.runs[:] = [run for _, run in pairs]


def calibrated(
    side: ModelSide, model: ModelSpec, inputs: Lengths, outputs: Lengths
) -> tuple[ModelSide, dict[str, object]]:
    """The profile re-scaled to this workload's own forwards in the running disaggregated stack
    (`--calibrate`; the rule `distserve profile --in-stack` applies, `instack.fit_to_stack`).

    Why it exists: on the 2 shared cores one worker slows the other by how much memory bandwidth
    and cache their forwards draw at once, which depends on the traffic. Why it is off by default:
    on 16/64 traffic one 100-request run at 2.85 req/s timed prefill forwards at 1.23x and decode
    steps at 1.10x the committed profile, while this ramp (1-4 req/s) gave 1.01x and 0.93x. The
    workload's effect is inside the run-to-run spread of this VM, so re-scaling adds noise."""
    from distserve_worker.profiling import fit, instack

    cal = instack.Calibration(
        inputs=inputs,
        outputs=outputs,
        token_budget=side.engine.token_budget,
        max_batch=side.engine.max_batch,
    )
    forwards = instack.calibrate(model, 1, cal)
    c = side.timing.coefficients
    stack = instack.fit_to_stack(c.prefill, fit.DecodeFit(c.decode, fit.NO_ERROR), forwards)
    timing = InstanceTiming(PhaseCoefficients(stack.prefill, stack.decode.ranges, c.padded), 1, 0.0)
    described = {
        "rates": list(cal.rates),
        "secondsPerRate": cal.seconds,
        "forwards": len(forwards.prefill) + len(forwards.decode),
        "prefillFactor": round(stack.prefill_factor, 3),
        "decodeFactor": round(stack.decode_factor, 3),
    }
    print(f"[bench] calibrated to {inputs.mean:g}/{outputs.mean:g} traffic: {described}", file=sys.stderr)
    return ModelSide(timing, side.transfer_ms, side.engine), described


def _attainment(run: RateRun, ttft_slo: float, tpot_slo: float) -> float:
    meas = run.results
    return sim.joint_attainment([m.ttft_ms for m in meas], [m.tpot_ms for m in meas], ttft_slo, tpot_slo)


def _attained(run: RateRun, ttft_slo: float, tpot_slo: float, target: float) -> bool:
    return _attainment(run, ttft_slo, tpot_slo) >= target


def _bounds(measured: dict[str, float]) -> tuple[float, float]:
    """(low, high) of a measured goodput."""
    if "goodput" in measured:
        return measured["goodput"], measured["goodput"]
    if "goodputAtLeast" in measured:
        return measured["goodputAtLeast"], float("inf")
    return 0.0, measured["goodputBelow"]


def verdict(entry: dict[str, object]) -> dict[str, object]:
    d, c = entry[DISAGGREGATED], entry[COLOCATED]  # same 2 cores: compare goodput directly
    predicted = "disaggregated" if d["predictedGoodput"] > c["predictedGoodput"] else "colocated"  # type: ignore[index]
    dl, dh = _bounds(d["measured"])  # type: ignore[index]
    cl, ch = _bounds(c["measured"])  # type: ignore[index]
    if dl > ch:
        measured = "disaggregated"
    elif cl > dh:
        measured = "colocated"
    else:
        measured = "undecided (measured goodput ranges overlap)"
    return {
        "workload": entry["workload"],
        "planner": predicted,
        "measured": measured,
        "match": predicted == measured,
    }


if __name__ == "__main__":
    raise SystemExit(main())
