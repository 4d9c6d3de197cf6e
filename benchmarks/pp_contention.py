"""Diagnosis: what a decode PP2 instance does to the rest of the local stack on a small machine.

The fidelity benchmark's stack (SmolLM2, one torch thread per worker process, prefill budget 512,
decode batch 32) under the same Poisson load twice: decode PP1 (two busy worker processes) and
decode PP2 (three: the prefill and two decode stages). Per configuration: prefill forwards'
measured time against the CPU profile's prediction for the same batch (median ratio, from the
prefill worker's own `GET /forwards`), TTFT p90, and the median decode step (stage 0's view: with
PP2 it is a micro-batch's whole trip through both stages).

    .venv/bin/python benchmarks/pp_contention.py [--rate 1.5] [--requests 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def forwards(port: int) -> list[list[float]]:
    """(rows, width, milliseconds) of the worker's recent forwards."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/forwards", timeout=5) as response:
        return list(json.loads(response.read())["forwards"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1.5)
    parser.add_argument("--requests", type=int, default=120)
    args = parser.parse_args()
    from distserve_operator import api
    from distserve_planner import profiles
    from distserve_planner.loaders import profile_files
    from distserve_planner.workload import Lengths, generate
    from distserve_worker.local.stack import LocalStack, StackConfig
    from distserve_worker.model_source import ModelSpec
    from distserve_worker.testing.load import run_load
    from distserve_worker.testing.plans import write_contract

    spec = api.load_manifest(ROOT / "benchmarks/fidelity-smollm2.yaml").spec
    profile = profile_files.load(ROOT / "deploy/profiles/smollm2-135m-cpu.json", spec.model.name)
    timing = profiles.latency_model(profile).instance(1, 1)
    assert timing is not None
    w = spec.workload
    reqs = generate(args.requests, 7, Lengths.from_spec(w.input_tokens), Lengths.from_spec(w.output_tokens))
    limits = api.EngineLimits(prefill_token_budget=512, decode_max_batch=32, decode_kv_tokens=65536)
    for pp, split in ((1, None), (2, [19, 11])):
        directory = Path(tempfile.mkdtemp(prefix=f"pp-contention-{pp}-"))
        plan = write_contract(
            directory, ModelSpec(), 30, 9, 3, decode=(1, pp), decode_split=split, limits=limits
        )
        with LocalStack(StackConfig.from_plan_file(plan, threads=1, log_dir=directory)) as stack:
            stack.wait_ready(300)
            results, _ = asyncio.run(
                run_load(
                    stack.url,
                    spec.model.name,
                    reqs.arrivals(args.rate),
                    list(reqs.inputs),
                    list(reqs.outputs),
                    seed=7,
                )
            )
            prefill = forwards(stack.proc("prefill-0").http_port)
            decode = forwards(stack.proc("decode-0").http_port)
        ratio = statistics.median(
            ms / timing.coefficients.prefill_ms(rows * width, rows * width * width)
            for rows, width, ms in prefill
        )
        ttft = sorted(m.ttft_ms for m in results)
        print(
            f"decode PP{pp} at {args.rate} req/s: prefill forwards {ratio:.2f}x the profile (median of "
            f"{len(prefill)}), TTFT p90 {ttft[int(0.9 * len(ttft))]:.0f} ms, decode step median "
            f"{statistics.median(ms for _, _, ms in decode):.0f} ms at a median of "
            f"{statistics.median(rows for rows, _, _ in decode):.0f} rows",
            flush=True,
        )


if __name__ == "__main__":
    main()
