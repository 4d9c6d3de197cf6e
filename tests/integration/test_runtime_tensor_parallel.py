"""Tensor parallelism in the real stack: router, prefill and decode instances whose tp ranks are
separate processes (gloo collectives, real gRPC, tiny Llama). Greedy output is token-identical to
the one-process reference for every prefill/decode TP pair (KV heads resharded on the pull), each
rank holds its own shard, and a rank killed mid-stream fails its instance's requests at once while
the other instances keep serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from distserve_worker.engine.runner import reference_greedy
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.client import complete
from distserve_worker.testing.tiny import greedy_body, save_tiny_model, tiny_model
from distserve_worker.testing.tiny import tiny_prompts as prompts

MAX_TOKENS = 12
PAIRS = [(1, 2), (2, 1), (2, 2)]  # (1, 1) is the plain stack (test_runtime_disaggregated.py)


def body(prompt, max_tokens=MAX_TOKENS, **extra):
    return greedy_body("tiny", prompt, max_tokens, **extra)


def tp_config(path, prefill_tp, decode_tp, **kw) -> StackConfig:
    return StackConfig(
        ModelSpec(name="tiny", kind="Path", path=str(path)),
        threads=1,
        prefill_args=["--tp", str(prefill_tp), "--decode-tp", str(decode_tp)],
        decode_args=["--tp", str(decode_tp)],
        **kw,
    )


def instances(stack) -> list[dict]:
    with urllib.request.urlopen(f"{stack.url}/v1/distserve/instances", timeout=5) as r:
        return json.loads(r.read())["instances"]


async def instances_async(session, stack) -> list[dict]:
    async with session.get(f"{stack.url}/v1/distserve/instances") as r:
        return (await r.json())["instances"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), PAIRS)
async def test_greedy_output_matches_the_reference_across_tp_pairs(tiny_path, prefill_tp, decode_tp):
    ps = prompts()
    model = tiny_model("llama")
    reference = [reference_greedy(model, p, MAX_TOKENS, eos={0}) for p in ps]
    with LocalStack(tp_config(tiny_path, prefill_tp, decode_tp)) as stack:
        stack.wait_ready(180)
        url = f"{stack.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            alone = await complete(session, url, body(ps[4]))
            together = await asyncio.gather(*(complete(session, url, body(p)) for p in ps))
        listed = instances(stack)
    assert alone.status == 200 and alone.token_ids == reference[4]
    assert [r.status for r in together] == [200] * 8
    assert [r.token_ids for r in together] == reference
    # What runs is what was asked: tp ranks per instance, each with its own key/value heads and
    # its shard of the weights.
    total = model.num_parameters()
    for inst in listed:
        tp = prefill_tp if inst["role"] == "prefill" else decode_tp
        assert inst["tp"] == tp and inst["ready"] and inst["layers"] == {"start": 0, "end": 2}
        ranks = inst["ranks"]
        assert [r["rank"] for r in ranks] == list(range(tp))
        assert [(r["kv_heads"]["start"], r["kv_heads"]["end"]) for r in ranks] == [
            (i * 2 // tp, (i + 1) * 2 // tp) for i in range(tp)
        ]
        for r in ranks:
            assert r["ready"] and r["device"] == "cpu"
            assert r["parameters"] <= total // tp + total // 10  # its shard (norms are replicated)


def follower_pids(pid: int) -> list[int]:
    """The follower ranks rank 0 started (its child processes)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


async def test_a_killed_rank_fails_its_instances_requests_and_the_others_keep_serving(tiny_path):
    with LocalStack(tp_config(tiny_path, 1, 2, decode=2)) as stack:
        stack.wait_ready(180)
        url = f"{stack.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            # A long stream (most of the tiny model's 512 positions): mid-flight when the rank dies.
            long = body("hello", max_tokens=480, ignore_eos=True, stream=True)
            stream = asyncio.ensure_future(complete(session, url, long, timeout=60))
            victim = None
            while victim is None:  # the decode instance running it
                assert not stream.done(), (await stream).error
                await asyncio.sleep(0.05)
                for inst in await instances_async(session, stack):
                    if inst["role"] == "decode" and inst["load"]["running"]:
                        victim = stack.decode_addresses.index(inst["address"])
            proc = stack.proc(f"decode-{victim}")
            (follower,) = follower_pids(proc.popen.pid)
            killed = time.monotonic()
            os.kill(follower, signal.SIGKILL)
            result = await stream
            failed_after = time.monotonic() - killed
            # Nothing hangs: the stream ends with the reason within seconds.
            assert result.error is not None and failed_after < 10
            assert "tensor-parallel rank 1" in result.error["message"]
            assert not ready(proc.http_port)
            assert "tensor-parallel rank 1" in await _healthz_reason(proc.http_port)
            # The router sees it at its next poll of the instances (every 2 s).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listed = {i["address"]: i for i in instances(stack) if i["role"] == "decode"}
                if listed[stack.decode_addresses[victim]]["ready"] is False:
                    break
                await asyncio.sleep(0.2)
            assert listed[stack.decode_addresses[victim]]["ready"] is False
            assert "not ready" in listed[stack.decode_addresses[victim]]["error"]
            # The router stops picking it; the other instance serves every new request.
            after = await asyncio.gather(*(complete(session, url, body(p)) for p in prompts()[:4]))
        assert [r.status for r in after] == [200] * 4
        assert proc.alive()  # reporting not ready, not crashed: the kubelet restarts the pod (/healthz)


@pytest.mark.slow
async def test_smollm2_at_decode_tp3_through_distserve_up_matches_the_reference(tmp_path):
    """The real model (9 heads, 3 KV heads) pinned to decode TP3: `distserve up` runs the pinned
    plan from its plan file and greedy output is token-identical to one process."""
    from distserve_worker.local.stack import free_port
    from distserve_worker.testing.up import distserve_up, greedy_through, smollm2_manifest, smollm2_reference

    model, ps, reference = smollm2_reference(16)
    manifest = tmp_path / "smollm2.yaml"
    pin = "{prefill: {tp: 1, pp: 1, replicas: 1}, decode: {tp: 3, pp: 1, replicas: 1}}"
    manifest.write_text(smollm2_manifest("smollm2-tp", pin))
    with distserve_up(manifest, free_port(), tmp_path / "logs") as base:
        tokens, listed = await greedy_through(base, ps, 16)
    assert tokens == reference
    decode = next(i for i in listed if i["role"] == "decode")
    assert decode["tp"] == 3 and [
        (k["kv_heads"]["start"], k["kv_heads"]["end"]) for k in decode["ranks"]
    ] == [(0, 1), (1, 2), (2, 3)]
    # Each rank holds a third of the weights (embeddings and LM head split by vocabulary too).
    assert all(k["parameters"] < model.num_parameters() * 0.34 for k in decode["ranks"])


async def test_a_killed_prefill_rank_takes_its_instance_out_and_requests_still_succeed(tiny_path):
    """Prefill TP2 x 2 instances: one loses its follower rank; nothing hangs, the router serves every
    request through the other instance, and the broken one says why."""
    with LocalStack(tp_config(tiny_path, 2, 1, prefill=2)) as stack:
        stack.wait_ready(180)
        deadline = time.monotonic() + 60
        while not all(i["ready"] for i in instances(stack)):  # the router's view: polled every 2 s
            assert time.monotonic() < deadline, instances(stack)
            await asyncio.sleep(0.2)
        victim = stack.proc("prefill-0")
        (follower,) = follower_pids(victim.popen.pid)
        os.kill(follower, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while ready(victim.http_port) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not ready(victim.http_port)  # within a fraction of a second of the rank's death
        # /healthz fails too (the kubelet restarts the pod with all its ranks), naming the rank.
        assert "tensor-parallel rank 1" in await _healthz_reason(victim.http_port)
        # Every request is served (the router retries a prefill that refuses before answering, and
        # drops the instance at its next poll); none hangs.
        url = f"{stack.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(complete(session, url, body(p), timeout=30) for p in prompts()))
        assert [r.status for r in results] == [200] * 8, [r.error for r in results]
        listed = {i["address"]: i for i in instances(stack) if i["role"] == "prefill"}
        assert listed[stack.prefill_addresses[0]]["ready"] is False
        assert listed[stack.prefill_addresses[1]]["ready"] is True


async def _healthz_reason(port: int) -> str:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())["reason"]
    return ""
