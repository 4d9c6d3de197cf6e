"""KV transfer over real gRPC on loopback (one process): a real prefill worker on a tiny Llama,
the real puller. The cache arrives bit for bit, a full buffer holds callers back, bad chunks are refused."""

import asyncio

import grpc
import pytest
import torch
import xxhash

from distserve_protos.generation.v1 import generation_pb2 as gen
from distserve_protos.generation.v1 import generation_pb2_grpc as gen_grpc
from distserve_protos.kvtransfer.v1 import kvtransfer_pb2 as kvpb
from distserve_protos.kvtransfer.v1 import kvtransfer_pb2_grpc as kv_grpc
from distserve_worker.engine.runner import ModelRunner, probe_kv_layout, reference_greedy
from distserve_worker.kvtransfer.codec import Expected, encode, split_wire
from distserve_worker.kvtransfer.transport import (
    GrpcKVPuller,
    KVPullError,
    KVTransferServicer,
    add_to_server,
    channel_options,
)
from distserve_worker.local.stack import free_port
from distserve_worker.metrics import RuntimeMetrics
from distserve_worker.model_source import ModelSpec
from distserve_worker.prefill import PrefillWorker
from distserve_worker.settings import PrefillSettings
from distserve_worker.testing.tiny import tiny_model

CHUNK = 1024


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


async def start_prefill(model, kv_buffer_bytes=1 << 30):
    port = free_port()
    settings = PrefillSettings(
        model=ModelSpec(name="tiny", kind="Path"),
        port=port,
        max_chunk_bytes=CHUNK,
        kv_buffer_bytes=kv_buffer_bytes,
    )
    runner = ModelRunner(model)
    worker = PrefillWorker(settings, runner, probe_kv_layout(runner), 512, RuntimeMetrics("prefill", "tiny"))
    server = grpc.aio.server(options=channel_options(CHUNK))
    gen_grpc.add_PrefillServiceServicer_to_server(worker, server)
    add_to_server(KVTransferServicer(worker.buffer, CHUNK), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop_task = asyncio.create_task(worker.batch_loop())
    return worker, server, loop_task, f"127.0.0.1:{port}"


def expected(worker, tokens):
    layout = worker.layout
    return Expected(layout.num_layers, tokens, layout.kv_heads, layout.head_dim, layout.dtype, CHUNK)


async def test_pulled_cache_is_bit_identical_and_released(model):
    worker, server, task, address = await start_prefill(model)
    puller = GrpcKVPuller(CHUNK)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gen_grpc.PrefillServiceStub(channel)
            prompt = list(range(5, 105))
            resp = await stub.Prefill(
                gen.PrefillRequest(request_id="r1", prompt_token_ids=prompt), timeout=30
            )
            assert resp.first_token_id == reference_greedy(model, prompt, 1, eos=set())[0]
            assert resp.kv_address == address and resp.kv_bytes >= 100 * worker.layout.bytes_per_token
            # What prefill holds (its encoded chunks) and what the pull delivers, byte for byte.
            held = b"".join(bytes(split_wire(m)[2]) for m in worker.buffer.get("r1").messages)
            pulled = await puller.pull(address, "r1", expected(worker, 100), timeout=30)
            received = b"".join(
                t.contiguous().view(torch.uint8).numpy().tobytes() for kv in pulled.layers for t in kv
            )
            assert received == held and len(held) == 100 * worker.layout.bytes_per_token
            # ... and those are the bytes of the model's own cache for this prompt.
            direct = ModelRunner(model).prefill([prompt])[0].kv
            assert all(
                torch.equal(a, b)
                for la, lb in zip(direct.layers, pulled.layers, strict=True)
                for a, b in zip(la, lb, strict=True)
            )
            await puller.release(address, "r1")
            assert worker.buffer.used == 0
            with pytest.raises(KVPullError, match="NOT_FOUND"):
                await puller.pull(address, "r1", expected(worker, 100), timeout=30)
    finally:
        await puller.close()
        task.cancel()
        await server.stop(None)


async def test_full_buffer_holds_the_next_prefill_until_a_release(model):
    per_token = probe_kv_layout(ModelRunner(model)).bytes_per_token
    worker, server, task, address = await start_prefill(model, kv_buffer_bytes=60 * per_token)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gen_grpc.PrefillServiceStub(channel)
            first = await stub.Prefill(
                gen.PrefillRequest(request_id="a", prompt_token_ids=[7] * 50), timeout=30
            )
            assert first.prompt_tokens == 50
            second = asyncio.ensure_future(
                stub.Prefill(gen.PrefillRequest(request_id="b", prompt_token_ids=[9] * 50), timeout=30)
            )
            for _ in range(100):  # wait (bounded) until it is visibly queued behind the full buffer
                if (await stub.Status(gen.StatusRequest(), timeout=5)).queued == 1:
                    break
                await asyncio.sleep(0.05)
            assert not second.done()
            status = await stub.Status(gen.StatusRequest(), timeout=5)
            assert (status.queued, status.kv_entries) == (1, 1)
            await worker.buffer.release("a")
            assert (await asyncio.wait_for(second, 30)).prompt_tokens == 50
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with grpc.aio.insecure_channel(address) as channel:
                await gen_grpc.PrefillServiceStub(channel).Prefill(
                    gen.PrefillRequest(request_id="huge", prompt_token_ids=[1] * 100), timeout=30
                )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        task.cancel()
        await server.stop(None)


class BadSender(kv_grpc.KVTransferServiceServicer):
    """A prefill instance gone wrong: flips a byte, or sends chunks bigger than agreed."""

    def __init__(self, kv, mode):
        self.kv, self.mode = kv, mode

    async def Pull(self, request, context):
        for message in encode(request.request_id, self.kv, CHUNK * 4 if self.mode == "oversized" else CHUNK):
            if self.mode == "corrupt" and message.WhichOneof("item") == "chunk" and message.chunk.offset > 0:
                data = bytearray(message.chunk.data)
                data[0] ^= 0xFF
                message.chunk.data = bytes(data)  # checksum left as it was: the receiver must notice
                assert message.chunk.checksum != xxhash.xxh3_64_intdigest(message.chunk.data)
            yield message


@pytest.mark.parametrize(
    ("mode", "reason"), [("corrupt", "checksum .*mismatch"), ("oversized", "RESOURCE_EXHAUSTED|oversized")]
)
async def test_corrupt_or_oversized_chunks_are_rejected(model, mode, reason):
    runner = ModelRunner(model)
    kv = runner.prefill([list(range(1, 80))])[0].kv
    port = free_port()
    server = grpc.aio.server()
    kv_grpc.add_KVTransferServiceServicer_to_server(BadSender(kv, mode), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    puller = GrpcKVPuller(CHUNK)
    layout = probe_kv_layout(runner)
    exp = Expected(layout.num_layers, 79, layout.kv_heads, layout.head_dim, layout.dtype, CHUNK)
    try:
        with pytest.raises(KVPullError, match=reason) as err:
            await puller.pull(f"127.0.0.1:{port}", "x", exp, timeout=30)
        if mode == "oversized":  # refused by gRPC's message limit or by the codec, never accepted
            assert "RESOURCE_EXHAUSTED" in str(err.value) or "oversized" in str(err.value)
    finally:
        await puller.close()
        await server.stop(None)


async def test_puller_of_another_checksum_version_is_refused_clearly(model):
    # A decode instance of the CRC-32 version sends no checksum_algorithm: refused before any data.
    _worker, server, task, address = await start_prefill(model)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await gen_grpc.PrefillServiceStub(channel).Prefill(
                gen.PrefillRequest(request_id="r1", prompt_token_ids=[3] * 20), timeout=30
            )
            old = kv_grpc.KVTransferServiceStub(channel).Pull(kvpb.PullRequest(request_id="r1"), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in old:
                    pass
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "XXH3_64" in err.value.details()
    finally:
        task.cancel()
        await server.stop(None)


def test_pull_request_is_protobuf():
    assert kvpb.PullRequest(request_id="x").SerializeToString() == b"\n\x01x"
