"""The router process as `distserve up --api-key-file` starts it, in front of fake prefill and decode
instances (in this process): 401 without the key, 200 with it, probes and metrics open, and a
rotated key file taking effect without a restart. About 4 s (the router's start-up)."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.local.stack import free_port
from distserve_worker.testing.tiny import byte_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support
from operator_support.fake_workers import FakeDecode, FakePrefill


@pytest.fixture
async def workers():
    server = grpc.aio.server()
    gen_grpc.add_PrefillServiceServicer_to_server(FakePrefill(), server)
    gen_grpc.add_DecodeServiceServicer_to_server(FakeDecode(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield address
    finally:
        await server.stop(None)


async def test_the_router_process_asks_for_a_key_and_takes_a_rotated_one(tmp_path, workers):
    model = tmp_path / "tiny"
    byte_tokenizer().save_pretrained(model)  # all the router loads
    keys = tmp_path / "keys"
    keys.write_text("sk-first\n")
    port = free_port()
    argv = [sys.executable, "-m", "distserve_worker.cli_worker", "router", "--model-name", "tiny"]
    argv += ["--model-source", "Path", "--model-path", str(model), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--prefill", workers, "--decode", workers, "--api-key-file", str(keys)]
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1}
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    async with session.get(f"{url}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)

            async with session.post(f"{url}/v1/completions", json=body) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
            first = {"Authorization": "Bearer sk-first"}
            async with session.post(f"{url}/v1/completions", json=body, headers=first) as r:
                assert r.status == 200, await r.text()
            async with session.get(f"{url}/metrics") as r:
                assert r.status == 200 and 'status="unauthorized"' in await r.text()
            async with session.get(f"{url}/healthz") as r:
                assert r.status == 200

            keys.write_text("sk-second\n")  # rotated in place: no restart
            second = {"Authorization": "Bearer sk-second"}
            deadline = time.monotonic() + 5
            while True:
                async with session.get(f"{url}/v1/models", headers=second) as r:
                    if r.status == 200:
                        break
                assert time.monotonic() < deadline, "the rotated key was not taken"
                await asyncio.sleep(0.2)
            async with session.get(f"{url}/v1/models", headers=first) as r:
                assert r.status == 401
        assert "sk-first" not in log.read_text() and "sk-second" not in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
