"""KV cache <-> protobuf chunk messages: raw tensor bytes with dtype, shape, offset and CRC-32.

Pure: no I/O. The encoder yields the header, then, for each layer, the keys' and then the values'
bytes in chunks of at most `max_chunk_bytes`. The assembler accepts them in that order only and
rejects anything inconsistent (wrong dtype/shape/order, oversized or corrupt chunk, too many bytes),
so a broken or hostile sender cannot make the receiver allocate or trust more than it expects.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from distserve_protos.kvtransfer.v1 import kvtransfer_pb2 as pb

from distserve_worker.engine.kvcache import SequenceKV

KINDS = (pb.TENSOR_KIND_KEY, pb.TENSOR_KIND_VALUE)


class KVCodecError(ValueError):
    """The received chunks do not form the expected KV cache."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise KVCodecError(f"unknown dtype {name!r}")
    return dtype


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's contiguous bytes, without copying when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def encode(request_id: str, kv: SequenceKV, max_chunk_bytes: int) -> Iterator[pb.PullResponse]:
    if max_chunk_bytes <= 0:
        raise ValueError("max_chunk_bytes must be positive")
    sizes = [len(tensor_bytes(t)) for layer in kv.layers for t in layer]
    num_chunks = sum(max(1, -(-size // max_chunk_bytes)) for size in sizes)
    yield pb.PullResponse(
        header=pb.KVHeader(
            request_id=request_id,
            num_layers=len(kv.layers),
            num_tokens=kv.num_tokens,
            total_bytes=sum(sizes),
            num_chunks=num_chunks,
        )
    )
    for layer, pair in enumerate(kv.layers):
        for kind, tensor in zip(KINDS, pair, strict=True):
            data = tensor_bytes(tensor)
            for offset in range(0, max(1, len(data)), max_chunk_bytes):
                piece = bytes(data[offset : offset + max_chunk_bytes])
                yield pb.PullResponse(
                    chunk=pb.KVChunk(
                        layer=layer,
                        kind=kind,
                        dtype=dtype_name(tensor.dtype),
                        shape=list(tensor.shape),
                        offset=offset,
                        data=piece,
                        crc32=zlib.crc32(piece),
                    )
                )


@dataclass(frozen=True)
class Expected:
    """What the receiver knows the cache must look like (from its own model and the request)."""

    num_layers: int
    num_tokens: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    max_chunk_bytes: int

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.num_tokens, self.head_dim)

    @property
    def tensor_bytes(self) -> int:
        return self.kv_heads * self.num_tokens * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()


class Assembler:
    """Feeds on PullResponse messages in order; `result()` returns the SequenceKV once complete."""

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self.header: pb.KVHeader | None = None
        self.buffers: list[bytearray] = []  # one per tensor, in (layer, key/value) order
        self.current = 0  # index of the tensor being filled
        self.filled = 0  # bytes of it received so far
        self.chunks = 0

    def feed(self, message: pb.PullResponse) -> None:
        exp = self.expected
        if message.WhichOneof("item") == "header":
            if self.header is not None:
                raise KVCodecError("second header")
            header = message.header
            if header.num_layers != exp.num_layers or header.num_tokens != exp.num_tokens:
                raise KVCodecError(
                    f"header says {header.num_layers} layers x {header.num_tokens} tokens, "
                    f"expected {exp.num_layers} x {exp.num_tokens}"
                )
            if header.total_bytes != 2 * exp.num_layers * exp.tensor_bytes:
                raise KVCodecError(f"header says {header.total_bytes} bytes, expected {2 * exp.num_layers * exp.tensor_bytes}")
            self.header = header
            self.buffers = [bytearray(exp.tensor_bytes) for _ in range(2 * exp.num_layers)]
            return
        if self.header is None:
            raise KVCodecError("chunk before header")
        chunk = message.chunk
        self.chunks += 1
        if len(chunk.data) > exp.max_chunk_bytes:
            raise KVCodecError(f"oversized chunk: {len(chunk.data)} bytes > limit {exp.max_chunk_bytes}")
        if self.current >= len(self.buffers):
            raise KVCodecError("more chunks than the cache holds")
        layer, kind = divmod(self.current, 2)
        where = f"layer {chunk.layer} {pb.TensorKind.Name(chunk.kind)} offset {chunk.offset}"
        if chunk.layer != layer or chunk.kind != KINDS[kind] or chunk.offset != self.filled:
            raise KVCodecError(f"out-of-order chunk ({where}), expected layer {layer} offset {self.filled}")
        if chunk.dtype != dtype_name(exp.dtype):
            raise KVCodecError(f"dtype {chunk.dtype!r} in {where}, expected {dtype_name(exp.dtype)!r}")
        if tuple(chunk.shape) != exp.tensor_shape:
            raise KVCodecError(f"shape {tuple(chunk.shape)} in {where}, expected {exp.tensor_shape}")
        if zlib.crc32(chunk.data) != chunk.crc32:
            raise KVCodecError(f"corrupt chunk: CRC-32 mismatch in {where}")
        end = self.filled + len(chunk.data)
        if end > exp.tensor_bytes:
            raise KVCodecError(f"chunk overruns its tensor ({where})")
        self.buffers[self.current][self.filled : end] = chunk.data
        self.filled = end
        if self.filled == exp.tensor_bytes:
            self.current += 1
            self.filled = 0

    def result(self) -> SequenceKV:
        if self.header is None or self.current != len(self.buffers):
            raise KVCodecError(f"incomplete KV cache: {self.current} of {len(self.buffers)} tensors received")
        exp = self.expected
        tensors = [torch.frombuffer(buf, dtype=exp.dtype).reshape(exp.tensor_shape) for buf in self.buffers]
        return SequenceKV([(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)])
