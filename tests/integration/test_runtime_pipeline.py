"""Pipeline stages in the real stack: each stage of an instance is its own process holding only its
layers, hidden states stream stage to stage over gRPC, decode micro-batches circulate through the
stages, and each decode stage pulls its own layers' KV from whichever prefill stages hold them.

Greedy output is token-identical to the one-process reference for every shape (equal and unequal
splits, prefill and decode of different depth, PP2 x TP2), the router's instance list shows each
instance's stages covering the model once, and a stage killed mid-stream fails its instance's
requests within seconds while the other instance keeps serving; restarted, it rejoins without the
other stages restarting.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import urllib.request

import aiohttp
import pytest

from distserve_worker.engine.runner import reference_greedy
from distserve_worker.local.stack import LocalStack, StackConfig
from distserve_worker.model_source import ModelSpec
from distserve_worker.testing.client import complete
from distserve_worker.testing.plans import write_contract
from distserve_worker.testing.tiny import greedy_body, save_tiny_model, tiny_model
from distserve_worker.testing.tiny import tiny_prompts as prompts

LAYERS = 4  # a 4-layer tiny Llama: stages of 1 to 3 layers
MAX_TOKENS = 12

# name: (prefill (tp, pp), decode (tp, pp), prefill split, decode split)
# Equal even splits run in the fault tests below, prefill PP2 + decode PP1 there and on SmolLM2.
SHAPES = {
    "pp2-pp2": ((1, 2), (1, 2), None, None),
    # Different splits: decode stage 0 pulls layer 0 from prefill stage 0 and layers 1-2 from stage 1.
    "pp2-pp2-uneven": ((1, 2), (1, 2), [1, 3], [3, 1]),
    "pp2-pp1": ((1, 2), (1, 1), None, None),
    "pp1-pp2": ((1, 1), (1, 2), None, None),
    "pp2xtp2-both": ((2, 2), (2, 2), None, None),
    # Both reshardings at once: heads (prefill TP2 -> decode TP1) and layers (different splits).
    "pp2xtp2-to-pp2xtp1-uneven": ((2, 2), (1, 2), [1, 3], [3, 1]),
}


def body(prompt: list[int], max_tokens: int = MAX_TOKENS, **extra: object) -> dict[str, object]:
    return greedy_body("tiny", prompt, max_tokens, **extra)


def instances(stack: LocalStack) -> list[dict]:
    with urllib.request.urlopen(f"{stack.url}/v1/distserve/instances", timeout=5) as r:
        return json.loads(r.read())["instances"]


def wait_instances(stack: LocalStack, check, timeout: float = 30.0) -> list[dict]:
    """The router's view once `check` holds (it polls instances every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        listed = instances(stack)
        if check(listed):
            return listed
        assert time.monotonic() < deadline, listed
        time.sleep(0.2)


def covering(stages: list[dict], layers: int) -> list[tuple[int, int]]:
    """The stages' layer ranges, checked to cover the model exactly once, in order."""
    spans = [(s["layers"]["start"], s["layers"]["end"]) for s in stages]
    assert spans[0][0] == 0 and spans[-1][1] == layers, spans
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans
    return spans


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama4"), layers=LAYERS)


def stack_config(tiny_path, tmp_path, shape: str, replicas=(1, 1)) -> StackConfig:
    prefill, decode, prefill_split, decode_split = SHAPES[shape]
    model = ModelSpec(name="tiny", kind="Path", path=str(tiny_path))
    plan = write_contract(
        tmp_path, model, LAYERS, 4, 2, prefill, decode, prefill_split, decode_split, replicas
    )
    return StackConfig.from_plan_file(plan, threads=1, log_dir=tmp_path)


@pytest.mark.parametrize("shape", sorted(set(SHAPES) - {"pp2-pp2", "pp2-pp1"}))
async def test_greedy_output_matches_the_reference_across_stage_shapes(tiny_path, tmp_path, shape):
    ps = prompts()
    model = tiny_model("llama", layers=LAYERS)
    reference = [reference_greedy(model, p, MAX_TOKENS, eos={0}) for p in ps]
    with LocalStack(stack_config(tiny_path, tmp_path, shape)) as stack:
        stack.wait_ready(180)
        url = f"{stack.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            # All at once: decode runs them as micro-batches in flight through its stages.
            results = await asyncio.gather(*(complete(session, url, body(p)) for p in ps))
            streamed = await complete(session, url, body(ps[5], stream=True))
        assert [r.status for r in results] == [200] * len(ps)
        assert [r.token_ids for r in results] == reference
        assert streamed.error is None and streamed.chunks == MAX_TOKENS
        listed = wait_instances(stack, lambda xs: all(i["ready"] for i in xs))
    prefill_shape, decode_shape = SHAPES[shape][:2]
    for inst in listed:
        tp, pp = prefill_shape if inst["role"] == "prefill" else decode_shape
        assert (inst["tp"], inst["pp"]) == (tp, pp)
        stages = inst["stages"] or [inst]  # pp 1: the instance is its one stage
        spans = covering(stages, LAYERS)
        assert all(len(s["ranks"]) == tp for s in stages)
        if pp > 1:
            split = SHAPES[shape][2 if inst["role"] == "prefill" else 3]
            assert [b - a for a, b in spans] == (split or [LAYERS // pp] * pp)
            whole = tiny_model("llama", layers=LAYERS).num_parameters()
            assert all(r["parameters"] < whole for s in stages for r in s["ranks"])


async def stream_many(session, url, n: int, max_tokens: int) -> list:
    ps = prompts(seed=7)[:n]
    return await asyncio.gather(
        *(
            complete(session, url, body(p, max_tokens=max_tokens, stream=True, ignore_eos=True), timeout=60)
            for p in ps
        )
    )


async def test_a_killed_decode_stage_fails_its_requests_and_rejoins_when_restarted(tiny_path, tmp_path):
    """Two decode instances of two stages each. Stage 1 of one is killed mid-stream: that instance's
    requests fail within seconds naming the stage (none hangs), it leaves the rotation while the
    other serves, and once its stage is restarted it is whole and serving again, its stage 0 never
    restarted."""
    config = stack_config(tiny_path, tmp_path, "pp2-pp2", replicas=(1, 2))
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        victim = stack.proc("decode-0").args[stack.proc("decode-0").args.index("--port") + 1]
        victim_address = f"127.0.0.1:{victim}"
        head_pid = stack.proc("decode-0").popen.pid
        url = f"{stack.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            running = asyncio.ensure_future(stream_many(session, url, 8, max_tokens=400))
            await asyncio.sleep(1.0)  # every request is streaming by now (tiny model: ~ms per token)
            killed = time.monotonic()
            stack.kill("decode-0-s1")
            results = await asyncio.wait_for(running, timeout=60)
            ended = time.monotonic() - killed
            failed = [r for r in results if r.error is not None]
            done = [r for r in results if r.error is None]
            assert failed, "no request was on the instance whose stage died"
            assert done, "no request was on the surviving instance"
            assert all(r.chunks == 400 for r in done)
            assert all("pipeline" in r.error["message"] and "stage 1" in r.error["message"] for r in failed)
            assert ended < 30  # failed within seconds, none hung until a timeout
            # Out of rotation with the reason; new requests go to the other instance.
            listed = wait_instances(
                stack, lambda xs: any(i["address"] == victim_address and "stage 1" in i["error"] for i in xs)
            )
            down = next(i for i in listed if i["address"] == victim_address)
            assert "stage 1" in down["error"]
            after = await asyncio.gather(*(complete(session, url, body(p)) for p in prompts()[:4]))
            assert [r.status for r in after] == [200] * 4
            # The kubelet restarts the stage: the chain is whole again, stage 0 untouched.
            stack.restart("decode-0-s1")
            wait_instances(stack, lambda xs: all(i["ready"] for i in xs))
            assert stack.proc("decode-0").popen.pid == head_pid and stack.proc("decode-0").alive()
            model = tiny_model("llama", layers=LAYERS)
            again = await asyncio.gather(*(complete(session, url, body(p)) for p in prompts()))
            assert [r.token_ids for r in again] == [
                reference_greedy(model, p, MAX_TOKENS, {0}) for p in prompts()
            ]


async def test_a_killed_prefill_stage_takes_its_instance_out_and_requests_still_succeed(tiny_path, tmp_path):
    config = stack_config(tiny_path, tmp_path, "pp2-pp1", replicas=(2, 1))
    with LocalStack(config) as stack:
        stack.wait_ready(180)
        port = stack.proc("prefill-1").args[stack.proc("prefill-1").args.index("--port") + 1]
        stack.kill("prefill-1-s1")
        url = f"{stack.url}/v1/completions"
        async with aiohttp.ClientSession() as session:
            # The router retries a prefill that failed on the broken instance on the other one.
            results = await asyncio.gather(*(complete(session, url, body(p)) for p in prompts()))
        assert [r.status for r in results] == [200] * len(results)
        listed = wait_instances(
            stack, lambda xs: any(i["address"] == f"127.0.0.1:{port}" and "stage 1" in i["error"] for i in xs)
        )
        down = next(i for i in listed if i["address"] == f"127.0.0.1:{port}")
        assert not down["ready"] and down["stages"][1]["ready"] is False


def children(pid: int) -> list[int]:
    """The processes `pid` started (a rank 0's follower ranks)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


async def test_sigterm_to_every_process_of_a_staged_sharded_decode_instance_finishes_its_stream(
    tiny_path, tmp_path
):
    """Scale-down of a decode instance of two stages of two ranks each: every process of it gets
    SIGTERM mid-stream (its later stage first; each process group, followers too, as all of a pod's
    processes are signalled). The stream still completes: the later stage serves its stage 0 until
    that one has drained and left, each follower rank its rank 0 until it closes; then all exit."""
    model = ModelSpec(name="tiny", kind="Path", path=str(tiny_path))
    plan = write_contract(tmp_path, model, LAYERS, 4, 2, (1, 1), (2, 2))
    with LocalStack(StackConfig.from_plan_file(plan, threads=1, log_dir=tmp_path)) as stack:
        stack.wait_ready(180)
        stages = [stack.proc("decode-0-s1"), stack.proc("decode-0")]
        followers = [pid for proc in stages for pid in children(proc.popen.pid)]
        async with aiohttp.ClientSession() as session:
            long = body(prompts()[2], max_tokens=120, stream=True, ignore_eos=True)
            stream = asyncio.ensure_future(
                complete(session, f"{stack.url}/v1/completions", long, timeout=120)
            )
            while not any(i["load"]["running"] for i in instances(stack) if i["role"] == "decode"):
                assert not stream.done(), (await stream).error
                await asyncio.sleep(0.05)
            for proc in stages:
                stack.terminate(proc.name)
            result = await stream
        assert result.error is None and result.chunks == 120
        assert [await asyncio.to_thread(proc.popen.wait, 60) for proc in stages] == [0, 0]
        assert [pid for pid in followers if os.path.exists(f"/proc/{pid}")] == []
        assert "(drained)" in stages[0].log.read_text() and "(drained)" in stages[1].log.read_text()


SMOLLM2_PINS = {
    "prefill-pp2-decode-pp2": "{prefill: {tp: 1, pp: 2, replicas: 1}, decode: {tp: 1, pp: 2, replicas: 1}}",
    "prefill-pp2-decode-pp1": "{prefill: {tp: 1, pp: 2, replicas: 1}, decode: {tp: 1, pp: 1, replicas: 1}}",
}


@pytest.mark.slow
@pytest.mark.parametrize("pin", sorted(SMOLLM2_PINS))
async def test_smollm2_with_pinned_pipeline_stages_through_distserve_up_matches_the_reference(tmp_path, pin):
    """The real model through `distserve up` with pinned pipeline plans: greedy output is
    token-identical to one process, and the stages hold the planner's cost-balanced split (the
    decode split gives the last stage fewer layers: it also holds the LM head)."""
    from distserve_worker.local.stack import free_port
    from distserve_worker.testing.up import distserve_up, greedy_through, smollm2_manifest, smollm2_reference

    model, ps, reference = smollm2_reference(16)
    manifest = tmp_path / "smollm2.yaml"
    manifest.write_text(smollm2_manifest(f"smollm2-{pin}", SMOLLM2_PINS[pin]))
    with distserve_up(manifest, free_port(), tmp_path / "logs") as base:
        tokens, listed = await greedy_through(base, ps, 16)
    assert tokens == reference
    layers = model.config.num_hidden_layers
    for inst in listed:
        stages = inst["stages"] or [inst]
        covering(stages, layers)
        assert len(stages) == (2 if inst["role"] == "prefill" or pin.endswith("pp2") else 1)
    decode = next(i for i in listed if i["role"] == "decode")
    if decode["stages"]:
        first, last = (s["layers"]["end"] - s["layers"]["start"] for s in decode["stages"])
        assert first > last
