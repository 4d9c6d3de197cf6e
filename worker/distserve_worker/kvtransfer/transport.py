"""Moving a KV cache from a prefill instance to a decode instance.

The decode side sees only the `KVPuller` interface (pull, release); `GrpcKVPuller` is the real one,
streaming `distserve.kvtransfer.v1` chunks. The prefill side serves them with `KVTransferServicer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

import grpc

from distserve_protos.kvtransfer.v1 import kvtransfer_pb2 as pb
from distserve_protos.kvtransfer.v1 import kvtransfer_pb2_grpc as pb_grpc
from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.kvtransfer.buffer import KVBuffer
from distserve_worker.kvtransfer.codec import (
    CHECKSUM_ALGORITHM,
    Assembler,
    EncodedKV,
    Expected,
    algorithm_name,
    encode_wire,
)
from distserve_worker.kvtransfer.prepared import PreparedKV
from distserve_worker.peers import KVPullError

SERVICE = "distserve.kvtransfer.v1.KVTransferService"
PULL_METHOD = f"/{SERVICE}/Pull"


PULL_ATTEMPTS = 3


def _identity(raw: bytes) -> bytes:
    return raw


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # gRPC's own size limit backs up the codec's: a message bigger than a chunk plus framing is refused.
    limit = max_message_bytes + 64 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class KVPuller(Protocol):
    async def pull(
        self,
        address: str,
        request_id: str,
        expected: Expected,
        timeout: float,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> SequenceKV: ...

    async def release(self, address: str, request_id: str) -> None: ...


class GrpcKVPuller:
    def __init__(self, max_chunk_bytes: int) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> pb_grpc.KVTransferServiceStub:
        if address not in self.channels:
            # A local subchannel pool: a fresh channel (the retry in `pull`) connects at once instead
            # of sharing the process-wide subchannel of the closed one, still in reconnect backoff
            # after the instance died, which made the retries fail with the old "Connection refused".
            options = [*channel_options(self.max_chunk_bytes), ("grpc.use_local_subchannel_pool", 1)]
            self.channels[address] = grpc.aio.insecure_channel(address, options=options)
        return pb_grpc.KVTransferServiceStub(self.channels[address])

    async def pull(
        self,
        address: str,
        request_id: str,
        expected: Expected,
        timeout: float,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> SequenceKV:
        """Pull (and check) one cache, or heads [start, end) of the model of it (`heads`), or layers
        [start, end) of the model (`layers`). A pull is idempotent until `release`, so an unreachable instance
        is retried a few times on a fresh channel: a prefill instance restarted at the same address
        is reached at once instead of after gRPC's reconnect backoff; a dead one fails in ~2 s."""
        for attempt in range(PULL_ATTEMPTS):
            try:
                return await self._pull_once(address, request_id, expected, timeout, heads, layers)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == PULL_ATTEMPTS - 1:
                    raise KVPullError(
                        f"pulling KV of {request_id} from {address}: {exc.code().name}: {exc.details()}"
                    ) from exc
                channel = self.channels.pop(address, None)
                if channel is not None:
                    await channel.close()
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _pull_once(
        self,
        address: str,
        request_id: str,
        expected: Expected,
        timeout: float,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> SequenceKV:
        assembler = Assembler(expected)
        self._stub(address)  # opens the channel
        # The stream is read as raw serialized PullResponse bytes, so each chunk's data is checked and
        # kept without protobuf copying it twice (codec.split_wire parses the metadata with protobuf).
        pull = self.channels[address].unary_stream(
            PULL_METHOD, request_serializer=pb.PullRequest.SerializeToString, response_deserializer=_identity
        )
        request = pb.PullRequest(
            request_id=request_id, max_chunk_bytes=self.max_chunk_bytes, checksum_algorithm=CHECKSUM_ALGORITHM
        )
        if heads is not None:
            request.head_start, request.head_end = heads
        if layers is not None:
            request.layer_start, request.layer_end = layers
        call = pull(request, timeout=timeout)
        # Each chunk is checked (XXH3-64, ~0.1 ms per MiB) and placed as it arrives, inline: a helper
        # thread overlapping the check with receiving (as with CRC-32) costs more in hand-offs than
        # the check itself now.
        try:
            async for raw in call:
                assembler.feed_wire(raw)
        except ValueError as exc:
            call.cancel()
            raise KVPullError(f"pulling KV of {request_id} from {address}: {exc}") from exc
        try:
            return assembler.result()
        except ValueError as exc:
            raise KVPullError(f"pulling KV of {request_id} from {address}: {exc}") from exc

    async def release(self, address: str, request_id: str) -> None:
        # Best effort: if the prefill instance is gone its buffer went with it; the deadline covers the rest.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub(address).Release(pb.ReleaseRequest(request_id=request_id), timeout=5.0)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()


class KVTransferServicer(pb_grpc.KVTransferServiceServicer):
    def __init__(
        self,
        buffer: KVBuffer,
        max_chunk_bytes: int,
        on_sent: Callable[[int, float], None] | None = None,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        self.buffer = buffer
        self.max_chunk_bytes = max_chunk_bytes
        self.on_sent = on_sent
        self.heads = heads  # the model-wide KV heads this rank holds (None: all of them)
        self.layers = layers  # the model-wide layers its stage holds (None: all of them)

    async def Pull(
        self, request: pb.PullRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullResponse]:
        held = self.buffer.get(request.request_id)
        if held is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no KV cache held for request {request.request_id!r}"
            )
        if request.checksum_algorithm != CHECKSUM_ALGORITHM:
            # An older puller verifies CRC-32, which is no longer sent: tell it why, before any data.
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this instance checksums KV chunks with {algorithm_name(CHECKSUM_ALGORITHM)}; the puller "
                f"asked for {algorithm_name(request.checksum_algorithm)} (mismatched versions?)",
            )
        limit = request.max_chunk_bytes or self.max_chunk_bytes
        wanted = (request.head_start, request.head_end)
        wanted_layers = (request.layer_start, request.layer_end)
        if isinstance(held, PreparedKV):
            heads = wanted if wanted != (0, 0) or self.heads is None else self.heads
            layers = wanted_layers if wanted_layers != (0, 0) or self.layers is None else self.layers
            if layers == (0, 0):  # the puller wants every layer held; there is one piece of them
                matches = [v for (h, _), v in held.pieces.items() if h == heads]
                piece = matches[0] if len(matches) == 1 else None
            else:
                piece = held.pieces.get((heads, layers))
            if piece is None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this rank prepared KV (heads, layers) {sorted(held.pieces)} of request "
                    f"{request.request_id!r}; the puller asked for {[list(heads), list(layers)]} (prefill "
                    "and decode disagree on the decode tp or stages: run both from the same plan)",
                )
            held = piece
        elif wanted != (0, 0) and self.heads is not None and wanted != self.heads:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this rank holds KV heads {list(self.heads)} whole; the puller asked for {list(wanted)} "
                "(prefill and decode disagree on the decode tp: run both from the same plan)",
            )
        elif wanted_layers != (0, 0) and self.layers is not None and wanted_layers != self.layers:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this stage holds KV layers {list(self.layers)} whole; the puller asked for "
                f"{list(wanted_layers)} (prefill and decode disagree on the stages: run both from the same plan)",
            )
        if isinstance(held, EncodedKV):
            if held.chunk_bytes > limit:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this instance sends {held.chunk_bytes}-byte chunks; the puller accepts {limit}",
                )
            messages: Iterable[bytes] = held.messages
        else:  # a cache stored as tensors is encoded now
            messages = encode_wire(request.request_id, held, min(self.max_chunk_bytes, limit))
        started = time.perf_counter()
        sent = 0
        for raw in messages:
            sent += len(raw)
            yield raw
        if self.on_sent:
            self.on_sent(sent, time.perf_counter() - started)

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=await self.buffer.release(request.request_id))


def add_to_server(servicer: KVTransferServicer, server: grpc.aio.Server) -> None:
    """Register the KV transfer service. Same method names and wire format as the generated
    `add_KVTransferServiceServicer_to_server` (any protobuf client works), except that Pull's
    messages are serialized by the codec itself, straight from the tensors."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Pull": grpc.unary_stream_rpc_method_handler(
                servicer.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=_identity
            ),
            "Release": grpc.unary_unary_rpc_method_handler(
                servicer.Release,
                request_deserializer=pb.ReleaseRequest.FromString,
                response_serializer=pb.ReleaseResponse.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
