"""`distserve profile`: time the real prefill and decode forwards, fit the latency model, write a
`distserve-profile/v1` file the planner loads (`distserve plan --profile FILE`).

    distserve profile -o deploy/profiles/smollm2-135m-cpu.json            # embedded SmolLM2, CPU
    distserve profile --random-llama llama-3-8b --dtype bfloat16 --device cuda -o llama8b-h100.json
    distserve profile --random-llama tiny --quick -o /tmp/p.json          # seconds (tests)

Runs with one torch thread by default, as each local worker process does. Progress goes to stderr;
stdout gets a one-line summary. Exit 0 written, 2 bad input (unknown device, unloadable model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument(
        "-f",
        "--filename",
        help="take spec.model from this DistServeDeployment manifest (with --in-stack, also the "
        "workload's prompt and output lengths for the ramp)",
    )
    m.add_argument("--model-name", help="model name (default: the embedded SmolLM2)")
    m.add_argument("--model-source", default="Embedded", help="Embedded, HuggingFace, Path, GGUF, PVC")
    m.add_argument("--model-path", default="", help="directory or .gguf file")
    m.add_argument("--gguf-file", default="", help="GGUF file inside --model-path")
    m.add_argument(
        "--random-llama",
        choices=["tiny", "llama-1b", "llama-3-8b"],
        help="a random-weight Llama of this shape instead of a real checkpoint",
    )
    m.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    r = parser.add_argument_group("measurement")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    r.add_argument("--threads", type=int, default=1, help="torch threads (local workers run 1 each)")
    r.add_argument("--quick", action="store_true", help="a small sweep (seconds on a tiny model)")
    r.add_argument("--repetitions", type=int, default=None, help="timings per point (median taken)")
    r.add_argument("--seed", type=int, default=0)
    st = parser.add_argument_group("in the running stack (instead of forwards timed alone)")
    st.add_argument(
        "--in-stack",
        action="store_true",
        help="time the forwards of a running local stack (router + prefill + decode) under load: "
        "the deployment's own contention is then part of the profile (CPU only)",
    )
    st.add_argument("--stack-rates", default="1,2,3,4", help="requests/s of the load ramp")
    st.add_argument("--stack-seconds", type=float, default=20.0, help="seconds of arrivals per rate")
    st.add_argument("--token-budget", type=int, default=512, help="the prefill worker's --token-budget")
    st.add_argument(
        "--quiet-timeout",
        type=float,
        default=300.0,
        help="seconds to wait before each rate for the machine to be quiet (other work would be measured as contention)",
    )
    parser.add_argument("-o", "--output", required=True, help="profile file to write")
    parser.add_argument("--samples", help="also write the raw measured points (JSON) here")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    import torch

    from distserve_planner import profiles
    from distserve_planner.loaders import profile_files
    from distserve_worker.engine.runner import ModelRunner
    from distserve_worker.profiling import fit, measure

    try:
        device = _device(args.device)
        if args.in_stack and (device.type != "cpu" or args.random_llama):
            raise ValueError("--in-stack runs the local stack's workers: CPU and a loadable model only")
        model, name, dtype, request_vocab = _load(args, device)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"cannot profile: {exc}", file=sys.stderr)
        return 2
    from distserve_worker.kvtransfer.memory import keep_freed_memory

    keep_freed_memory(measure.CHUNK_BYTES)  # the allocator as the workers set it (cli_worker.run)
    torch.set_num_threads(max(1, args.threads))
    runner = ModelRunner(model)  # threads set above; ModelRunner only sets them when given
    sweep = measure.QUICK if args.quick else measure.FULL
    if args.repetitions:
        sweep = measure.Sweep(
            sweep.prefill_batches, sweep.decode_batches, sweep.decode_contexts, args.repetitions
        )
    load_before = os.getloadavg()[0]
    vocab = measure.vocab_size(model)
    progress = not args.quiet
    prefill_points = measure.measure_prefill(runner, sweep, vocab, args.seed, progress)
    decode_points = measure.measure_decode(runner, sweep, vocab, args.seed, progress)
    method = f"{len(prefill_points)} prefill + {len(decode_points)} decode points x {sweep.repetitions} reps, median"
    prefill_coef, prefill_err = fit.fit_prefill(prefill_points)
    decode_fit = fit.fit_decode(decode_points)
    stack_samples: dict[str, object] | None = None
    if args.in_stack:
        from distserve_worker.profiling import instack

        del runner, model  # the stack's workers load their own copies
        cal = instack.Calibration(
            rates=tuple(float(r) for r in args.stack_rates.split(",")),
            seconds=args.stack_seconds,
            token_budget=args.token_budget,
            vocab=request_vocab,
            quiet_timeout_s=args.quiet_timeout,
        )
        if args.filename:  # the deployment's own traffic drives the ramp
            from distserve_operator import api
            from distserve_planner.workload import Lengths

            w = api.load_manifest(args.filename).spec.workload
            cal = dataclasses.replace(
                cal, inputs=Lengths.from_spec(w.input_tokens), outputs=Lengths.from_spec(w.output_tokens)
            )
        spec = _spec(args, dtype)
        forwards = instack.calibrate(spec, args.threads, cal, progress)
        if not forwards.prefill or not forwards.decode:
            print("cannot profile: the stack timed no forwards; see its logs above", file=sys.stderr)
            return 2
        seen = len(forwards.prefill) + len(forwards.decode)
        stack = instack.fit_to_stack(prefill_coef, decode_fit, forwards)
        prefill_coef, prefill_err, decode_fit = stack.prefill, stack.prefill_error, stack.decode
        prefill_points, decode_points = stack.prefill_points, stack.decode_points
        method += (
            f"; scaled to the running local stack ({seen} forwards under load at {args.stack_rates} req/s, "
            f"{args.stack_seconds:g} s each, prompts {_lengths(cal.inputs)}, outputs {_lengths(cal.outputs)} tokens, "
            f"token budget {args.token_budget}): prefill x{stack.prefill_factor:.3f}, "
            f"decode x{stack.decode_factor:.3f}; fit errors below are against the stack's forwards"
        )
        stack_samples = {"prefillFactor": stack.prefill_factor, "decodeFactor": stack.decode_factor}
    load_after = os.getloadavg()[0]
    all_pred = [fit.prefill_ms(prefill_coef, p) for p in prefill_points] + [
        decode_fit.ms(p) for p in decode_points
    ]
    all_meas = [p.ms for p in prefill_points] + [p.ms for p in decode_points]
    overall = fit.errors(all_pred, all_meas)
    source = (
        f"distserve profile (torch {torch.__version__}, {args.threads} thread(s), {method}; "
        f"fit error prefill median {prefill_err.median_percent:.1f}% max "
        f"{prefill_err.max_percent:.1f}%, decode median {decode_fit.error.median_percent:.1f}% max "
        f"{decode_fit.error.max_percent:.1f}%; load average {load_before:.2f}->{load_after:.2f} "
        f"on {os.cpu_count()} cores; {platform.node()})"
    )
    profile = profiles.Profile(
        model=name,
        dtype=dtype,
        device=_device_name(device, args.threads),
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        source=source,
        entries=[
            profiles.ProfileEntry(
                tp=1,
                pp=1,
                prefill=_round(prefill_coef),
                decode_ranges=tuple(
                    profiles.DecodeRangeEntry(from_batch=start, coefficients=_round(abc))
                    for start, abc in decode_fit.ranges
                ),
                # The worker pads a batch to its longest row, prefill and decode (engine/).
                batching="padded",
                samples=len(prefill_points) + len(decode_points),
                fit_error_percent=round(overall.mean_percent, 2),
            )
        ],
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    profile_files.save(profile, args.output)
    if args.samples:
        Path(args.samples).write_text(
            json.dumps(
                {
                    "prefill": [{"lengths": list(p.lengths), "ms": round(p.ms, 4)} for p in prefill_points],
                    "decode": [
                        {"batch": p.batch, "ctxTokens": p.ctx_tokens, "ms": round(p.ms, 4)}
                        for p in decode_points
                    ],
                }
                | ({"inStack": stack_samples} if stack_samples else {}),
                indent=1,
            )
            + "\n"
        )
    print(
        f"wrote {args.output}: {name} {dtype} on {profile.device}; prefill {fit.format_abc(prefill_coef)}, "
        f"decode {decode_fit.describe()}; fit error mean {overall.mean_percent:.1f}% max {overall.max_percent:.1f}%"
    )
    return 0


def _lengths(lengths: Any) -> str:
    return f"mean {lengths.mean:g}" + (f" p90 {lengths.p90:g}" if lengths.p90 else "")


def _round(c: tuple[float, float, float]) -> tuple[float, float, float]:
    return (float(f"{c[0]:.6g}"), float(f"{c[1]:.6g}"), float(f"{c[2]:.6g}"))


def _device(text: str) -> Any:
    import torch

    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; fix: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: only cpu and cuda are supported")
    return device


def _device_name(device: Any, threads: int) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU ({cpu}, {threads} thread{'s' if threads != 1 else ''})"


def _load(args: argparse.Namespace, device: Any) -> tuple[Any, str, str, int]:
    """(model on `device`, model name, dtype, ids a request may use)."""
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    if args.random_llama:
        from distserve_worker.profiling.randommodel import MODEL_NAMES, random_llama

        model = random_llama(args.random_llama, dtype, str(device), args.seed)
        from distserve_worker.profiling.measure import vocab_size

        return model, MODEL_NAMES[args.random_llama], dtype, vocab_size(model)
    from distserve_worker.model_source import load_model

    spec = _spec(args, dtype)
    with contextlib.redirect_stdout(sys.stderr):  # the loader's progress lines are not our output
        model, tokenizer = load_model(spec)
    # The ids a request may use are the tokenizer's (a model's embedding table may be larger).
    return model.to(device), spec.name, spec.dtype, len(tokenizer)


def _spec(args: argparse.Namespace, dtype: str) -> Any:
    """The model to profile as the workers load it: -f's spec.model, or the --model-* flags."""
    from distserve_worker.model_source import ModelSpec

    if args.filename:
        from distserve_operator import api

        spec = ModelSpec.from_api(api.load_manifest(args.filename).spec.model)
        if args.dtype:
            spec = ModelSpec(spec.name, spec.kind, spec.path, args.dtype, spec.gguf_file)
        return spec
    return ModelSpec(
        name=args.model_name or ModelSpec.name,
        kind=args.model_source,
        path=args.model_path,
        dtype=args.dtype or dtype,
        gguf_file=args.gguf_file,
    )
