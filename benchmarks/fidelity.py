"""Planner fidelity: the simulator's predictions with a measured CPU profile against the real local
stack (router + one prefill + one decode process, one torch thread each) under the same Poisson load.

    .venv/bin/python benchmarks/fidelity.py [--profile deploy/profiles/smollm2-135m-cpu.json]
        [-f benchmarks/fidelity-smollm2.yaml] [--requests 150] [--rates 0.3,0.6,0.9]
        [--json benchmarks/results/fidelity.json]

Requests (arrival times at 1 req/s, prompt and output lengths) come from the manifest's workload with
the planner's own seeded generator, so both sides see the same list, scaled to each rate. Rates
default to 0.5x, 1.0x and 1.5x the goodput the simulator predicts for these requests. Per rate:
TTFT p90, TPOT p90 and SLO attainment, predicted and measured; then the goodput both ways
(measured: where attainment crosses the target between measured rates, linearly).
A PNG of predicted and measured attainment against the rate is drawn beside the JSON
(`plot_fidelity.py`, which redraws it from the JSON alone; needs the plot extra).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_model import ModelSide, Predicted, goodput, interpolated_goodput
from fidelity_stack import measure_rates
from plot_fidelity import draw_next_to

from distserve_operator import api
from distserve_planner import simulator as sim
from distserve_planner.loaders import architecture
from distserve_planner.workload import Lengths, generate
from distserve_worker.local.stack import StackConfig
from distserve_worker.model_source import ModelSpec, load_tokenizer
from distserve_worker.testing.load import Measured, token_range

ROOT = Path(__file__).resolve().parents[1]
BRACKET = 0.10  # bisect the measured goodput's bracket down to this relative width
TARGETS = {"p90RelativeError": 0.20, "attainmentPoints": 10.0, "goodputRelativeError": 0.15}


def p90(values: list[float]) -> float:
    return sim.percentile(values, 90)


def rel(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured > 0 else float("inf")


def summary(pred: Predicted, meas: list[Measured], ttft_slo: float, tpot_slo: float) -> dict[str, object]:
    m_ttft = [m.ttft_ms for m in meas]
    m_tpot = [m.tpot_ms for m in meas]
    m_att = sim.joint_attainment(m_ttft, m_tpot, ttft_slo, tpot_slo)
    p_att = pred.attainment(ttft_slo, tpot_slo)
    row: dict[str, object] = {
        "ttftP90Millis": {"predicted": round(p90(pred.ttft_ms), 1), "measured": round(p90(m_ttft), 1)},
        "tpotP90Millis": {"predicted": round(p90(pred.tpot_ms), 1), "measured": round(p90(m_tpot), 1)},
        "attainmentPercent": {"predicted": round(100 * p_att, 1), "measured": round(100 * m_att, 1)},
        "failedRequests": sum(1 for m in meas if not m.ok),
    }
    row["ttftP90Error"] = round(rel(p90(pred.ttft_ms), p90(m_ttft)), 3)
    row["tpotP90Error"] = round(rel(p90(pred.tpot_ms), p90(m_tpot)), 3)
    row["attainmentErrorPoints"] = round(abs(100 * (p_att - m_att)), 1)
    return row


def lone_row(model: ModelSide, shape: tuple[int, int], lone: list[Measured]) -> dict[str, object]:
    pred = model.disaggregated(1, 1, [0.0], [shape[0]], [shape[1]])
    ok = [m for m in lone if m.ok]
    ttft = statistics.median(m.ttft_ms for m in ok) if ok else float("inf")
    tpot = statistics.median(m.tpot_ms for m in ok) if ok else float("inf")
    return {
        "inputTokens": shape[0],
        "outputTokens": shape[1],
        "ttftMillis": {"predicted": round(pred.ttft_ms[0], 1), "measuredMedian": round(ttft, 1)},
        "tpotMillis": {"predicted": round(pred.tpot_ms[0], 1), "measuredMedian": round(tpot, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-f", "--filename", default=str(ROOT / "benchmarks/fidelity-smollm2.yaml"))
    parser.add_argument("--profile", default=str(ROOT / "deploy/profiles/smollm2-135m-cpu.json"))
    parser.add_argument("--requests", type=int, default=150, help="requests per rate")
    parser.add_argument("--rates", help="comma-separated req/s (default: 0.5x, 1x, 1.5x predicted goodput)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--decode-pp",
        type=int,
        default=1,
        help="decode pipeline stages (one process each, the planner's split) against the planner's PP pricing",
    )
    parser.add_argument(
        "--bisections", type=int, default=3, help="extra rates measured to narrow down the goodput"
    )
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/fidelity.json"))
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=300.0,
        help="seconds to wait before each rate for the machine to be quiet (then it measures anyway)",
    )
    args = parser.parse_args(argv)

    spec = api.load_manifest(args.filename).spec
    ttft_slo, tpot_slo = float(spec.slo.ttft_millis), float(spec.slo.tpot_millis)
    target = spec.slo.attainment_percent / 100
    w = spec.workload
    reqs = generate(
        args.requests, args.seed, Lengths.from_spec(w.input_tokens), Lengths.from_spec(w.output_tokens)
    )
    inputs, outputs = list(reqs.inputs), list(reqs.outputs)
    model = ModelSide.load(args.profile, spec, decode_pp=args.decode_pp, requests=reqs)

    def predict(rate: float) -> Predicted:
        return model.disaggregated(1, 1, reqs.arrivals(rate), inputs, outputs)

    predicted_goodput = goodput(lambda r: predict(r).attainment(ttft_slo, tpot_slo), target, high=50.0)
    rates = (
        [float(r) for r in args.rates.split(",")]
        if args.rates
        else [round(predicted_goodput * k, 3) for k in (0.5, 1.0, 1.5)]
    )
    print(
        f"predicted goodput {predicted_goodput:.3f} req/s for {args.requests} requests "
        f"(inputs mean {reqs.mean_input:.0f}, outputs {reqs.mean_output:.0f}); rates {rates}",
        file=sys.stderr,
    )
    load_before = os.getloadavg()
    model_spec = ModelSpec.from_api(spec.model)
    # Prompts are random ids of the model's own ordinary vocabulary (any manifest's model).
    ids = token_range(len(load_tokenizer(model_spec)))
    config = StackConfig(
        model=model_spec,
        prefill=1,
        decode=1,
        threads=1,  # one core's worth per worker process, as the profile was measured
        prefill_args=model.engine.prefill_args(),
        decode_args=model.engine.decode_args(),
        slo_millis=(spec.slo.ttft_millis, spec.slo.tpot_millis),
    )
    if args.decode_pp > 1:  # stages run through a runtime contract, as `distserve up` runs them
        config = pipeline_config(spec, model, args.decode_pp)
    started = time.perf_counter()
    rows = []
    lone_shape = (round(reqs.mean_input), round(reqs.mean_output))
    lone, runs = measure_rates(
        config,
        reqs,
        rates,
        args.seed,
        "disaggregated",
        lone=lone_shape,
        ids=ids,
        quiet_timeout_s=args.quiet_timeout,
    )
    for rate, run in zip(rates, runs, strict=True):
        row: dict[str, object] = {"rate": rate} | run.describe()
        row |= summary(predict(rate), run.results, ttft_slo, tpot_slo)
        rows.append(row)

    def measure_one(rate: float, label: str) -> None:
        _, extra = measure_rates(
            config,
            reqs,
            [rate],
            args.seed,
            f"disaggregated ({label})",
            ids=ids,
            quiet_timeout_s=args.quiet_timeout,
        )
        row = {"rate": rate} | extra[0].describe()
        rows.append(row | summary(predict(rate), extra[0].results, ttft_slo, tpot_slo))
        rates.append(rate)
        order = sorted(range(len(rates)), key=rates.__getitem__)
        rows[:] = [rows[i] for i in order]
        rates[:] = [rates[i] for i in order]

    def attained(row: dict[str, object]) -> bool:
        return float(row["attainmentPercent"]["measured"]) >= 100 * target  # type: ignore[index]

    if not args.rates and not any(attained(r) for r in rows):
        # The real goodput is below every rate tried: one lower rate so it can still be bracketed.
        measure_one(round(rates[0] / 2, 3), "extra low rate")
    # Attainment falls steeply at the knee, so a straight line between rates 2x apart says little
    # about where it crosses: bisect the bracket until it is within BRACKET of its midpoint.
    for _ in range(0 if args.rates else args.bisections):
        ok = [r for r, row in zip(rates, rows, strict=True) if attained(row)]
        bad = [r for r, row in zip(rates, rows, strict=True) if not attained(row) and ok and r > max(ok)]
        if not ok or not bad or min(bad) / max(ok) - 1 <= BRACKET:
            break
        measure_one(round((max(ok) + min(bad)) / 2, 3), "bisecting the knee")
    measured_att = [float(r["attainmentPercent"]["measured"]) / 100 for r in rows]  # type: ignore[index]
    predicted_att = [float(r["attainmentPercent"]["predicted"]) / 100 for r in rows]  # type: ignore[index]
    measured_goodput = interpolated_goodput(rates, measured_att, target)
    predicted_interp = interpolated_goodput(rates, predicted_att, target)
    result = {
        "benchmark": "planner fidelity",
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadAverageBefore": [round(x, 2) for x in load_before],
            "loadAverageAfter": [round(x, 2) for x in os.getloadavg()],
        },
        "manifest": os.path.relpath(args.filename, ROOT),
        "profile": os.path.relpath(args.profile, ROOT),
        "slo": {"ttftMillis": ttft_slo, "tpotMillis": tpot_slo, "attainmentPercent": 100 * target},
        "requestsPerRate": args.requests,
        "seed": args.seed,
        "configuration": (
            "1 prefill + 1 decode process, 1 torch thread each, router on loopback"
            if args.decode_pp == 1
            else f"1 prefill process + 1 decode instance of {args.decode_pp} stage processes (layers "
            f"{'+'.join(map(str, model.decode_split))}), 1 torch thread each, router on loopback"
        ),
        "engine": model.engine.describe(),
        # One request alone on the idle stack: what the environment (CPU share, router, client)
        # costs before any queueing, against the profile's prediction for the same request.
        "loneRequest": lone_row(model, lone_shape, lone),
        "rates": rows,
        "goodput": {
            "predicted": round(predicted_goodput, 3),
            "predictedInterpolated": None if predicted_interp is None else round(predicted_interp, 3),
            "measured": None if measured_goodput is None else round(measured_goodput, 3),
            "measuredBound": None
            if measured_goodput is not None
            else (f"below {min(rates)}" if max(measured_att) < target else f"at least {max(rates)}"),
            "relativeError": None
            if measured_goodput is None
            else round(rel(predicted_goodput, measured_goodput), 3),
        },
        "targets": TARGETS,
        "benchmarkSeconds": round(time.perf_counter() - started, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    draw_next_to(args.json)  # the PNG beside it (plot_fidelity.py redraws it from the JSON alone)
    print(table(result))
    return 0


def pipeline_config(spec: api.DistServeDeploymentSpec, model: ModelSide, pp: int) -> StackConfig:
    """One prefill process and one decode instance of `pp` stage processes, from a contract with
    the engine limits the simulation uses and the split it priced."""
    import tempfile

    from distserve_worker.testing.plans import write_contract

    arch = architecture.resolve(spec.model)
    limits = api.EngineLimits(
        prefill_token_budget=model.engine.token_budget,
        decode_max_batch=model.engine.max_batch,
        decode_kv_tokens=model.engine.kv_tokens,
    )
    plan = write_contract(
        Path(tempfile.mkdtemp(prefix="fidelity-pp-")),
        ModelSpec.from_api(spec.model),
        arch.layers,
        arch.heads,
        arch.kv_heads,
        decode=(1, pp),
        decode_split=list(model.decode_split),
        limits=limits,
    )
    return StackConfig.from_plan_file(
        plan, threads=1, slo_millis=(spec.slo.ttft_millis, spec.slo.tpot_millis)
    )


def table(result: dict[str, object]) -> str:
    lines = [
        f"{'rate':>6} | {'TTFT p90 pred/meas ms':>22} | {'TPOT p90 pred/meas ms':>22} | {'attain pred/meas %':>19}"
    ]
    for r in result["rates"]:  # type: ignore[attr-defined]
        t, p, a = r["ttftP90Millis"], r["tpotP90Millis"], r["attainmentPercent"]
        lines.append(
            f"{r['rate']:>6} | {t['predicted']:>10} / {t['measured']:<9} | {p['predicted']:>10} / "
            f"{p['measured']:<9} | {a['predicted']:>8} / {a['measured']:<8}"
        )
    g = result["goodput"]
    lines.append(
        f"goodput req/s: predicted {g['predicted']} (interpolated {g['predictedInterpolated']}), measured {g['measured']}"
    )  # type: ignore[index]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
