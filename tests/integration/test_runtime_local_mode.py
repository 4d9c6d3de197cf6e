"""`distserve up` as a user runs it: plans the example manifest, starts the processes, serves real
requests, and stops everything on Ctrl-C (SIGINT)."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from distserve_worker.local.stack import free_port
from distserve_worker.model_source import ModelSpec, load_model
from distserve_worker.testing.client import complete
from distserve_worker.testing.up import tiny_manifest as tiny_manifest_text

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "local-smollm2.yaml"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
async def test_up_serves_the_manifest_and_stops_on_ctrl_c(tmp_path):
    load_model(ModelSpec())  # the GGUF conversion (first run only) is not what this test is about
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distserve_operator.cli",
            "up",
            "-f",
            str(MANIFEST),
            "--port",
            str(port),
            "--log-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output = []
    try:
        while True:
            line = lines.get(timeout=300)
            output.append(line)
            if "is serving" in line:
                break
        assert f"http://127.0.0.1:{port}" in output[-1]
        async with aiohttp.ClientSession() as session:
            result = await complete(
                session,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                {"model": ModelSpec().name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                timeout=120,
            )
        assert result.status == 200 and result.text
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not port_open(port)
        for log in tmp_path.glob("*.log"):  # every child wrote its log and is gone with its ports
            assert log.stat().st_size > 0
    finally:
        if proc.poll() is None:  # failed half-way: let `up` stop its children, then make sure
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    while not lines.empty():
        output.append(lines.get())
    assert any("stopped." in line for line in output), "".join(output[-20:])


def tiny_manifest(tmp_path, model_dir, pin):
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_manifest_text("tiny", model_dir, pin))
    return path


def up(manifest, port, log_dir):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distserve_operator.cli",
            "up",
            "-f",
            str(manifest),
            "--port",
            str(port),
            "--log-dir",
            str(log_dir),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


async def test_up_runs_a_pinned_tensor_parallel_plan_through_its_plan_file(tmp_path):
    """A tiny Llama (4 heads, 2 KV heads) pinned to prefill TP1 + decode TP2: `distserve up` writes
    the contract, every process starts from it, the topology table shows the ranks, requests work."""
    from distserve_operator.api import Role
    from distserve_worker.contract import load_contract
    from distserve_worker.testing.tiny import save_tiny_model

    model_dir = save_tiny_model("llama", tmp_path / "model")
    pin = "{prefill: {tp: 1, pp: 1, replicas: 1}, decode: {tp: 2, pp: 1, replicas: 1}}"
    manifest, logs, port = tiny_manifest(tmp_path, model_dir, pin), tmp_path / "logs", free_port()
    proc = up(manifest, port, logs)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output = []
    try:
        while not any("is serving" in line for line in output):
            output.append(lines.get(timeout=180))
        contract = load_contract(logs / "plan.json")
        assert (contract.prefill.tp, contract.decode.tp) == (1, 2) and contract.plan.pinned
        assert contract.phase(Role.DECODE).stages[0].layers.end == 2
        table = [
            line.split()
            for line in output[output.index(next(x for x in output if x.startswith("instance"))) :]
        ]
        prefill_row = next(row for row in table if row[1:2] == ["prefill"])
        decode_row = next(row for row in table if row[1:2] == ["decode"])
        # instance role state stage [start, end) tp rank device params KV-tokens [kv heads) ready
        assert prefill_row[2:7] == ["ready", "0", "[0,", "2)", "1"] and prefill_row[-1] == "yes"
        assert decode_row[2:8] == ["ready", "0", "[0,", "2)", "2", "0"] and decode_row[-1] == "yes"
        assert table[table.index(decode_row) + 1][0] == "1"  # decode's rank 1 on the next row
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/v1/distserve/instances") as response:
                doc = await response.json()
            decode = next(i for i in doc["instances"] if i["role"] == "decode")
            assert decode["tp"] == 2 and [r["kv_heads"] for r in decode["ranks"]] == [
                {"start": 0, "end": 1},
                {"start": 1, "end": 2},
            ]
            result = await complete(
                session,
                f"http://127.0.0.1:{port}/v1/completions",
                {
                    "model": "tiny-llama",
                    "prompt": "Hello",
                    "max_tokens": 4,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
                timeout=60,
            )
        assert result.status == 200 and len(result.token_ids) == 4
        for log in ("prefill-0.log", "decode-0.log", "router.log"):
            assert (logs / log).stat().st_size > 0
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not port_open(port)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    while not lines.empty():
        output.append(lines.get())
    assert any("stopped." in line for line in output), "".join(output[-20:])


def test_up_refuses_more_pipeline_stages_than_the_model_has_layers_and_names_the_pin(tmp_path):
    from distserve_worker.testing.tiny import save_tiny_model

    model_dir = save_tiny_model("llama", tmp_path / "model")  # 2 layers
    pin = "{prefill: {tp: 1, pp: 1, replicas: 1}, decode: {tp: 1, pp: 4, replicas: 1}}"
    proc = up(tiny_manifest(tmp_path, model_dir, pin), free_port(), tmp_path / "logs")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "PP4" in out and "2 layers" in out and "spec.planner.pin" in out, out
    assert not list((tmp_path / "logs").glob("*.log"))  # nothing was started
