"""`distserve profile`: time the real prefill and decode forwards, fit the latency model, write a
`distserve-profile/v1` file the planner loads (`distserve plan --profile FILE`).

    distserve profile -o deploy/profiles/smollm2-135m-cpu.json            # embedded SmolLM2, CPU
    distserve profile --random-llama llama-3-8b --dtype bfloat16 --device cuda -o llama8b-h100.json
    distserve profile --random-llama tiny --quick -o /tmp/p.json          # seconds (tests)
    distserve profile --random-llama llama-3-8b --device cuda --tp 1,2,4 -o llama8b-h100.json

`--tp 1,2,4` writes one entry per TP size: TP t runs t rank processes, one device each, sharded and
synchronised by the workers' own TP code (`profiling/tpmeasure.py`). A size the model cannot be
split over, or that needs more devices than there are, is skipped with a line on stderr.

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
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (TP > 1 uses cuda:0..TP-1)")
    r.add_argument(
        "--tp",
        default="1",
        help="tensor-parallel sizes to measure, comma-separated (e.g. 1,2,4): one profile entry each",
    )
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
    from distserve_worker.profiling import fit, measure

    try:
        device = _device(args.device)
        tps = _tp_sizes(args.tp)
        if args.in_stack and (device.type != "cpu" or args.random_llama):
            raise ValueError("--in-stack runs the local stack's workers: CPU and a loadable model only")
        if args.in_stack and tps != (1,):
            raise ValueError(f"--tp {args.tp} with --in-stack: the local stack runs TP1; use --tp 1")
        name, dtype = _identity(args, device)
        config = _config(args, dtype) if max(tps) > 1 else None
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"cannot profile: {exc}", file=sys.stderr)
        return 2
    from distserve_worker.profiling import tpmeasure

    # Every size is checked before anything is timed: a refusal is known in a second, a sweep takes minutes.
    cuda_devices = torch.cuda.device_count() if device.type == "cuda" else 0
    runnable = []
    for tp in tps:
        reason = tpmeasure.refusal(config, tp, device.type, cuda_devices) if tp > 1 else ""
        if reason:
            print(f"[profile] skipping TP{tp} (--tp {args.tp}): {reason}", file=sys.stderr, flush=True)
        else:
            runnable.append(tp)
    if not runnable:
        print(
            f"cannot profile: no size in --tp {args.tp} can run this model here (see above)", file=sys.stderr
        )
        return 2
    from distserve_worker.kvtransfer.memory import keep_freed_memory

    keep_freed_memory(measure.CHUNK_BYTES)  # the allocator as the workers set it (cli_worker.run)
    torch.set_num_threads(max(1, args.threads))
    sweep = measure.QUICK if args.quick else measure.FULL
    if args.repetitions:
        sweep = measure.Sweep(
            sweep.prefill_batches, sweep.decode_batches, sweep.decode_contexts, args.repetitions
        )
    load_before = os.getloadavg()[0]
    progress = not args.quiet
    method = f"{sweep.repetitions} reps per point, median"
    stack_samples: dict[str, object] | None = None
    fitted: list[_Fitted] = []
    for tp in runnable:
        if tp == 1:
            try:
                tp1, stack_note, stack_samples = _measure_tp1(args, device, dtype, sweep, progress)
            except ValueError as exc:
                print(f"cannot profile: {exc}", file=sys.stderr)
                return 2
            method += stack_note
            fitted.append(tp1)
            continue
        try:
            prefill_points, decode_points = tpmeasure.measure(
                tp,
                sweep,
                device_type=device.type,
                dtype=dtype,
                threads=args.threads,
                seed=args.seed,
                random_llama=args.random_llama,
                model=None if args.random_llama else dataclasses.asdict(_spec(args, dtype)),
                progress=progress,
            )
        except tpmeasure.RankFailed as exc:
            print(f"cannot profile: {exc}", file=sys.stderr)
            return 2
        fitted.append(_fit(tp, prefill_points, decode_points))
    load_after = os.getloadavg()[0]
    # Per TP size, kept short: the operator's Job returns the profile in a 4096-byte message.
    per_tp = "; ".join(
        f"TP{f.tp} {len(f.prefill_points)} prefill + {len(f.decode_points)} decode points, fit error "
        f"prefill median {f.prefill_error.median_percent:.1f}% max {f.prefill_error.max_percent:.1f}%, "
        f"decode median {f.decode.error.median_percent:.1f}% max {f.decode.error.max_percent:.1f}%"
        for f in fitted
    )
    source = (
        f"distserve profile (torch {torch.__version__}, {args.threads} thread(s) per rank, {method}; "
        f"{per_tp}; load average {load_before:.2f}->{load_after:.2f} on {os.cpu_count()} cores; "
        f"{platform.node()})"
    )
    profile = profiles.Profile(
        model=name,
        dtype=dtype,
        device=_device_name(device, args.threads),
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        source=source,
        entries=[
            profiles.ProfileEntry(
                tp=f.tp,
                pp=1,
                prefill=_round(f.prefill),
                decode_ranges=tuple(
                    profiles.DecodeRangeEntry(from_batch=start, coefficients=_round(abc))
                    for start, abc in f.decode.ranges
                ),
                # The worker pads a batch to its longest row, prefill and decode (engine/).
                batching="padded",
                samples=len(f.prefill_points) + len(f.decode_points),
                fit_error_percent=round(f.overall.mean_percent, 2),
            )
            for f in fitted
        ],
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    profile_files.save(profile, args.output)
    if args.samples:
        # TP1's points at the top (the file's original shape), other sizes under "tensorParallel".
        raw: dict[str, object] = {}
        for f in fitted:
            if f.tp == 1:
                raw |= _raw(f)
            else:
                raw.setdefault("tensorParallel", {})[str(f.tp)] = _raw(f)  # type: ignore[index]
        Path(args.samples).write_text(
            json.dumps(raw | ({"inStack": stack_samples} if stack_samples else {}), indent=1) + "\n"
        )
    for f in fitted:
        print(
            f"wrote {args.output}: {name} {dtype} on {profile.device}, TP{f.tp}; prefill "
            f"{fit.format_abc(f.prefill)}, decode {f.decode.describe()}; fit error mean "
            f"{f.overall.mean_percent:.1f}% max {f.overall.max_percent:.1f}%"
        )
    return 0


@dataclasses.dataclass(frozen=True)
class _Fitted:
    """One TP size's measured points and the latency model fitted to them."""

    tp: int
    prefill_points: list[Any]
    decode_points: list[Any]
    prefill: tuple[float, float, float]
    prefill_error: Any
    decode: Any
    overall: Any


def _fit(
    tp: int,
    prefill_points: list[Any],
    decode_points: list[Any],
    prefill: Any = None,
    prefill_error: Any = None,
    decode: Any = None,
) -> _Fitted:
    """Fit the points (or take an in-stack scaled fit as given) and the overall error on them."""
    from distserve_worker.profiling import fit

    if prefill is None:
        prefill, prefill_error = fit.fit_prefill(prefill_points)
        decode = fit.fit_decode(decode_points)
    predicted = [fit.prefill_ms(prefill, p) for p in prefill_points] + [decode.ms(p) for p in decode_points]
    measured = [p.ms for p in prefill_points] + [p.ms for p in decode_points]
    overall = fit.errors(predicted, measured)
    return _Fitted(tp, prefill_points, decode_points, prefill, prefill_error, decode, overall)


def _raw(f: _Fitted) -> dict[str, object]:
    return {
        "prefill": [{"lengths": list(p.lengths), "ms": round(p.ms, 4)} for p in f.prefill_points],
        "decode": [
            {"batch": p.batch, "ctxTokens": p.ctx_tokens, "ms": round(p.ms, 4)} for p in f.decode_points
        ],
    }


def _measure_tp1(
    args: argparse.Namespace, device: Any, dtype: str, sweep: Any, progress: bool
) -> tuple[_Fitted, str, dict[str, object] | None]:
    """TP1 in this process, as a TP1 worker runs (no process group); with --in-stack, scaled to the
    running local stack. (fit, what the method adds to the profile's source, in-stack samples)."""
    import torch

    from distserve_worker.engine.runner import ModelRunner
    from distserve_worker.profiling import measure

    try:
        model, _, _, request_vocab = _load(args, device)
    except (OSError, RuntimeError) as exc:
        raise ValueError(str(exc)) from exc
    runner = ModelRunner(model)  # threads set by run(); ModelRunner only sets them when given
    tag = f"TP1 (1 rank on {device.type})"
    prefill_points, decode_points = measure.measure_both(runner, sweep, args.seed, tag, progress)
    # Free the device for the TP > 1 ranks that may follow (they use cuda:0 too).
    del runner, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fitted = _fit(1, prefill_points, decode_points)
    if not args.in_stack:
        return fitted, "", None
    from distserve_worker.profiling import instack

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
    forwards = instack.calibrate(_spec(args, dtype), args.threads, cal, progress)
    if not forwards.prefill or not forwards.decode:
        raise ValueError("the stack timed no forwards; see its logs above")
    seen = len(forwards.prefill) + len(forwards.decode)
    stack = instack.fit_to_stack(fitted.prefill, fitted.decode, forwards)
    note = (
        f"; scaled to the running local stack ({seen} forwards under load at {args.stack_rates} req/s, "
        f"{args.stack_seconds:g} s each, prompts {_lengths(cal.inputs)}, outputs {_lengths(cal.outputs)} tokens, "
        f"token budget {args.token_budget}): prefill x{stack.prefill_factor:.3f}, "
        f"decode x{stack.decode_factor:.3f}; fit errors below are against the stack's forwards"
    )
    scaled = _fit(
        1, stack.prefill_points, stack.decode_points, stack.prefill, stack.prefill_error, stack.decode
    )
    return scaled, note, {"prefillFactor": stack.prefill_factor, "decodeFactor": stack.decode_factor}


def _tp_sizes(text: str) -> tuple[int, ...]:
    """--tp's sizes, ascending and each once."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--tp {text!r}: give positive TP sizes separated by commas, e.g. --tp 1,2,4")
    return tuple(sizes)


def _identity(args: argparse.Namespace, device: Any) -> tuple[str, str]:
    """(model name, dtype) the profile is written for, before anything is loaded."""
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    if args.random_llama:
        from distserve_worker.profiling.randommodel import MODEL_NAMES

        return MODEL_NAMES[args.random_llama], dtype
    spec = _spec(args, dtype)
    return spec.name, spec.dtype


def _config(args: argparse.Namespace, dtype: str) -> Any:
    """The model's transformers config (no weights): what each TP size is checked against."""
    if args.random_llama:
        from distserve_worker.profiling.randommodel import random_config

        return random_config(args.random_llama)
    from distserve_worker.model_source import load_config

    return load_config(_spec(args, dtype))


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
