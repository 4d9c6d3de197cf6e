"""The router sends a prefill that an instance failed before answering to another instance."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for operator_support

from operator_support.fake_workers import FakeDecode, FakePrefill, Vocab, router_for, serving

from distserve_worker.model_source import ModelSpec
from distserve_worker.router.app import build_app
from distserve_worker.settings import RouterSettings


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
    prefills = [StoppingPrefill(), StoppingPrefill()]
    async with serving(prefills[0], FakeDecode()) as a, serving(prefills[1], FakeDecode()) as b:
        addresses = [a, b]
        # The router breaks ties by address: the instance it tries first is the one that stops.
        first = min(range(2), key=lambda i: addresses[i])
        prefills[first].stopping = True
        settings = RouterSettings(model=ModelSpec(name="m"), prefill=(a, b), decode=(a,))
        async with (
            router_for(settings, Vocab()) as router,
            TestClient(TestServer(build_app(router))) as client,
        ):
            body = {"model": "m", "prompt": [1, 2], "max_tokens": 1}
            response = await client.post("/v1/completions", json=body)
            assert response.status == 200, await response.text()
        assert prefills[first].calls == 1 and prefills[1 - first].calls == 1
