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
