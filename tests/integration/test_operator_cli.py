"""`distserve operator` as users run it: a subprocess (kopf flags passed through) against the
API-server emulator over HTTP; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from kmock import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.emulator import ApiServerEmulator
from operator_support.harness import CR, NS, eventually
from operator_support.manifests import dsd

DISTSERVE = Path(sys.executable).with_name("distserve")


async def test_cli_runs_the_operator_with_kopf_flags(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        liveness_port = s.getsockname()[1]
    log = tmp_path / "operator.log"
    async with ApiServerEmulator() as api, Server(api) as server, aiohttp.ClientSession() as session:
        api.register_resources()
        url = str(server.url).rstrip("/")
        command = [
            str(DISTSERVE), "operator", "--api-server", url, "--router-metrics-url", "http://127.0.0.1:9/metrics",
            # kopf's flags, untouched. (--namespace makes kopf list /api/v1/namespaces, a path kmock
            # 0.8 cannot parse, so this test runs cluster-wide.)
            "--standalone", "--all-namespaces", "--liveness", f"http://127.0.0.1:{liveness_port}/healthz",
        ]  # fmt: skip
        env = {**os.environ, "DISTSERVE_OPERATOR_METRICS_PORT": "off"}
        with log.open("wb") as out:  # a file, not a pipe: a full pipe would block the operator
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            path = f"{url}/apis/distserve.io/v1alpha1/namespaces/{NS}/distservedeployments"
            async with session.post(path, json=dsd("llm")) as r:
                assert r.status < 400
            plan = await eventually(
                lambda: ((api.fetch(CR, NS, "llm") or {}).get("status") or {}).get("plan"),
                timeout=60,
                what="status.plan from the CLI operator",
            )
            assert plan["prefill"]["replicas"] >= 1
            async with session.get(f"http://127.0.0.1:{liveness_port}/healthz") as r:
                assert r.status == 200  # kopf's liveness endpoint, from the passed-through flag
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 60)
        assert proc.returncode == 0, log.read_text()[-3000:]
