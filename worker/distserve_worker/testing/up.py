"""`distserve up -f MANIFEST` as a test drives it: started as a user would, stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def distserve_up(manifest: Path, port: int, log_dir: Path, threads: int = 1) -> Iterator[str]:
    """Run `distserve up` until it says it is serving; yields the router's URL; Ctrl-C at the end."""
    argv = [sys.executable, "-m", "distserve_operator.cli", "up", "-f", str(manifest), "--port", str(port)]
    argv += ["--log-dir", str(log_dir), "--threads", str(threads)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:  # its own progress, until the stack is up
            seen.append(line)
            if "is serving" in line:
                break
        if proc.poll() is not None:
            raise RuntimeError("distserve up exited:\n" + "".join(seen[-30:]))
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ("Hi", "What is the capital of France?", "Name three colors, separated by commas.")


def local_manifest(
    name: str,
    model: str,
    source: str,
    *,
    slo_millis: tuple[int, int] = (1000, 200),
    inputs: str = "{mean: 16}",
    outputs: int = 8,
    gpus_per_node: int = 4,
    pin: str = "",
    mode: str = "",
) -> str:
    """A DistServeDeployment for this machine (CPU, one node, autoscaling off): `source` and
    `inputs` in flow YAML, `pin` the flow YAML of `spec.planner.pin` (none when empty), `mode`
    its spec.serving.mode (the default when empty)."""
    planner = f"\n  planner:\n    pin: {pin}" if pin else ""
    planner += f"\n  serving: {{mode: {mode}}}" if mode else ""
    return f"""apiVersion: distserve.io/v1alpha1
kind: DistServeDeployment
metadata: {{name: {name}}}
spec:
  model:
    name: {model}
    source: {source}
    dtype: float32
  slo: {{ttftMillis: {slo_millis[0]}, tpotMillis: {slo_millis[1]}, attainmentPercent: 90}}
  workload:
    requestsPerSecond: "1"
    inputTokens: {inputs}
    outputTokens: {{mean: {outputs}}}
  cluster:
    gpu: {{type: CPU}}
    gpusPerNode: {gpus_per_node}
    nodes: 1
  placement: {{affinity: High}}
  autoscaling: {{mode: "Off"}}{planner}
"""


def tiny_manifest(
    name: str, model_dir: Path | str, pin: str = "", gpus_per_node: int = 4, mode: str = ""
) -> str:
    """A tiny Llama saved at `model_dir` (`testing/tiny.py`) as a manifest."""
    source = f"{{kind: Path, path: {model_dir}}}"
    return local_manifest(name, "tiny-llama", source, gpus_per_node=gpus_per_node, pin=pin, mode=mode)


def smollm2_manifest(name: str, pin: str) -> str:
    """The embedded SmolLM2 on this machine, with `spec.planner.pin` set to `pin` (flow YAML)."""
    return local_manifest(
        name,
        SMOLLM2,
        "{kind: Embedded}",
        slo_millis=(5000, 1000),
        inputs="{mean: 64, p90: 128}",
        outputs=32,
        pin=pin,
    )


def smollm2_reference(max_tokens: int) -> tuple[Any, list[list[int]], list[list[int]]]:
    """(model, chat prompts of QUESTIONS, their one-process greedy outputs); converts the GGUF once
    for the workers too."""
    from distserve_worker.engine.runner import reference_greedy
    from distserve_worker.model_source import ModelSpec, eos_token_ids, load_model

    model, tokenizer = load_model(ModelSpec())
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for q in QUESTIONS
    ]
    eos = eos_token_ids(model, tokenizer)
    return model, prompts, [reference_greedy(model, p, max_tokens, eos) for p in prompts]


async def greedy_through(
    base: str, prompts: list[list[int]], max_tokens: int
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Each prompt's greedy tokens through the stack at `base`, one at a time, and its instance list."""
    import aiohttp

    from distserve_worker.testing.client import complete

    body = {"model": SMOLLM2, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    async with aiohttp.ClientSession() as session:
        results = [
            await complete(session, f"{base}/v1/completions", body | {"prompt": p}, timeout=120)
            for p in prompts
        ]
        async with session.get(f"{base}/v1/distserve/instances") as r:
            listed = (await r.json())["instances"]
    return [r.token_ids for r in results], listed
