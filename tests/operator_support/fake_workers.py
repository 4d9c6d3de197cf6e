"""Minimal prefill and decode gRPC servicers for router tests: always ready, one token per stream."""

from __future__ import annotations

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc


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
