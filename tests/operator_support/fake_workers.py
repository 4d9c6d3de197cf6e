"""Minimal prefill and decode gRPC servicers for router tests (always ready, one token per
stream), a server for them, and a router in front of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.router.app import Router
from distserve_worker.settings import RouterSettings


class FakePrefill(gen_grpc.PrefillServiceServicer):
    async def Status(self, request, context):
        return gen.WorkerStatus(role="prefill", free_slots=4, max_context=512, ready=True)

    async def Prefill(self, request, context):
        return gen.PrefillResponse(
            request_id=request.request_id,
            first_token_id=7,
            prompt_tokens=len(request.prompt_token_ids),
            kv_address="127.0.0.1:1",
        )


class FakeDecode(gen_grpc.DecodeServiceServicer):
    async def Status(self, request, context):
        return gen.WorkerStatus(role="decode", free_slots=4, max_context=512, ready=True)

    async def Decode(self, request, context):
        yield gen.TokenEvent(
            request_id=request.request_id, token_id=request.first_token_id, text="x", index=0, finish_reason=1
        )


class Vocab:
    """A tokenizer stand-in for requests that send token ids: only its size is read."""

    def __len__(self) -> int:
        return 100


@contextlib.asynccontextmanager
async def serving(prefill: Any, decode: Any) -> AsyncIterator[str]:
    """One gRPC server holding both servicers; yields its address."""
    server = grpc.aio.server()
    gen_grpc.add_PrefillServiceServicer_to_server(prefill, server)
    gen_grpc.add_DecodeServiceServicer_to_server(decode, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield address
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def router_for(settings: RouterSettings, tokenizer: Any = None) -> AsyncIterator[Router]:
    """The router of `settings`, its instances polled once, closed afterwards."""
    router = Router(settings, tokenizer=tokenizer, metrics=RuntimeMetrics("router", settings.model.name))
    try:
        await asyncio.gather(router.prefill.refresh(), router.decode.refresh())
        yield router
    finally:
        await router.prefill.close()
        await router.decode.close()
