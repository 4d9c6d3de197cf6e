"""The router sends a prefill that an instance failed before answering to another instance."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.fake_workers import FakeDecode, FakePrefill

from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.model_source import ModelSpec
from distserve_worker.router.app import Router, build_app
from distserve_worker.settings import RouterSettings


class Vocab:
    def __len__(self):
        return 100


class StoppingPrefill(FakePrefill):
    """Answers, or (`stopping`) fails every call as a server that stops with it in flight does."""

    def __init__(self) -> None:
        self.stopping = False
        self.calls = 0

    async def Prefill(self, request, context):
        self.calls += 1
        if self.stopping:
            await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        return await super().Prefill(request, context)


async def test_a_prefill_cancelled_by_its_instance_is_retried_on_another() -> None:
    servers, prefills, addresses = [], [], []
    for _ in range(2):
        server, prefill = grpc.aio.server(), StoppingPrefill()
        gen_grpc.add_PrefillServiceServicer_to_server(prefill, server)
        gen_grpc.add_DecodeServiceServicer_to_server(FakeDecode(), server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
        prefills.append(prefill)
    # The router breaks ties by address: the instance it tries first is the one that stops.
    first = min(range(2), key=lambda i: addresses[i])
    prefills[first].stopping = True
    settings = RouterSettings(model=ModelSpec(name="m"), prefill=tuple(addresses), decode=(addresses[0],))
    router = Router(settings, tokenizer=Vocab(), metrics=RuntimeMetrics("router", "m"))
    await router.prefill.refresh()
    await router.decode.refresh()
    try:
        async with TestClient(TestServer(build_app(router))) as client:
            response = await client.post(
                "/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 1}
            )
            assert response.status == 200, await response.text()
        assert prefills[first].calls == 1 and prefills[1 - first].calls == 1
    finally:
        await router.prefill.close()
        await router.decode.close()
        for server in servers:
            await server.stop(None)
