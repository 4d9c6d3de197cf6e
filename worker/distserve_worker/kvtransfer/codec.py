"""KV cache <-> protobuf chunk messages: raw tensor bytes with dtype, shape, offset and XXH3-64.

Pure: no I/O. The encoder yields the header, then, for each layer, the keys' and then the values'
bytes in chunks of at most `max_chunk_bytes`. The assembler accepts them in that order only and
rejects anything inconsistent (wrong dtype/shape/order, oversized or corrupt chunk, too many bytes,
another checksum algorithm), so a broken or hostile sender cannot make the receiver allocate or
trust more than it expects.

The checksum is XXH3-64 (xxHash), not zlib's CRC-32: on the receiving side it is one full pass over
the cache, and at ~10 GB/s instead of ~1.5 GB/s it no longer costs a pull about as much as the
transfer itself. It detects accidental corruption (a random change goes unnoticed with probability
2^-64); like CRC-32 it is no defence against a sender that forges both data and checksum.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import xxhash

from distserve_protos.kvtransfer.v1 import kvtransfer_pb2 as pb
from distserve_worker.engine.kvcache import SequenceKV

KINDS = (pb.TENSOR_KIND_KEY, pb.TENSOR_KIND_VALUE)
CHECKSUM_ALGORITHM = pb.CHECKSUM_ALGORITHM_XXH3_64


def checksum(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 (seed 0) of the bytes: the value of `KVChunk.checksum` under CHECKSUM_ALGORITHM_XXH3_64."""
    return xxhash.xxh3_64_intdigest(data)


def algorithm_name(algorithm: int) -> str:
    try:
        return pb.ChecksumAlgorithm.Name(algorithm)
    except ValueError:
        return f"unknown checksum algorithm {algorithm}"


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


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _len_prefix(field_number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(length)


def encode_wire(request_id: str, kv: SequenceKV, max_chunk_bytes: int) -> Iterator[bytes]:
    """The pull stream as serialized `PullResponse` messages, byte-identical to protobuf's own
    serialization (fields in number order), but with each chunk's bytes copied once, straight from
    the tensor, instead of three times (slice, message field, serialization)."""
    if max_chunk_bytes <= 0:
        raise ValueError("max_chunk_bytes must be positive")
    sizes = [len(tensor_bytes(t)) for layer in kv.layers for t in layer]
    num_chunks = sum(max(1, -(-size // max_chunk_bytes)) for size in sizes)
    header = pb.KVHeader(
        request_id=request_id,
        num_layers=len(kv.layers),
        num_tokens=kv.num_tokens,
        total_bytes=sum(sizes),
        num_chunks=num_chunks,
        checksum_algorithm=CHECKSUM_ALGORITHM,
    )
    yield pb.PullResponse(header=header).SerializeToString()
    for layer, pair in enumerate(kv.layers):
        for kind, tensor in zip(KINDS, pair, strict=True):
            data = tensor_bytes(tensor)
            for offset in range(0, max(1, len(data)), max_chunk_bytes):
                piece = data[offset : offset + max_chunk_bytes]
                meta = pb.KVChunk(
                    layer=layer,
                    kind=kind,
                    dtype=dtype_name(tensor.dtype),
                    shape=list(tensor.shape),
                    offset=offset,
                ).SerializeToString()
                data_prefix = _len_prefix(6, len(piece))
                tail = pb.KVChunk(checksum=checksum(piece)).SerializeToString()
                size = len(meta) + len(data_prefix) + len(piece) + len(tail)
                yield b"".join((_len_prefix(2, size), meta, data_prefix, piece, tail))


@dataclass(frozen=True)
class EncodedKV:
    """A cache already in wire form: what the prefill buffer holds, so a pull only sends bytes."""

    messages: list[bytes]
    chunk_bytes: int

    @property
    def nbytes(self) -> int:
        return sum(len(m) for m in self.messages)


def encode_cache(request_id: str, kv: SequenceKV, max_chunk_bytes: int) -> EncodedKV:
    return EncodedKV(list(encode_wire(request_id, kv, max_chunk_bytes)), max_chunk_bytes)


def encode(request_id: str, kv: SequenceKV, max_chunk_bytes: int) -> Iterator[pb.PullResponse]:
    """The pull stream as message objects (tests, tools); same content as `encode_wire`."""
    for raw in encode_wire(request_id, kv, max_chunk_bytes):
        yield pb.PullResponse.FromString(raw)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise KVCodecError("truncated message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise KVCodecError("malformed varint")


def split_wire(raw: bytes) -> tuple[pb.KVHeader | None, pb.KVChunk | None, memoryview]:
    """Parse one serialized PullResponse without copying the chunk's data: (header, None, empty) or
    (None, chunk metadata without `data`, view of the data). The metadata is parsed by protobuf."""
    buf = memoryview(raw)
    tag, pos = _read_varint(buf, 0)
    if tag & 7 != 2:
        raise KVCodecError("malformed PullResponse")
    length, pos = _read_varint(buf, pos)
    body = buf[pos : pos + length]
    if len(body) != length or pos + length != len(buf):
        raise KVCodecError("malformed PullResponse")
    if tag >> 3 == 1:
        return pb.KVHeader.FromString(body), None, memoryview(b"")
    if tag >> 3 != 2:
        raise KVCodecError(f"unknown PullResponse field {tag >> 3}")
    meta: list[memoryview] = []
    data = memoryview(b"")
    pos = 0
    while pos < len(body):
        start = pos
        tag, pos = _read_varint(body, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(body, pos)
        elif wire == 2:
            length, pos = _read_varint(body, pos)
            if pos + length > len(body):
                raise KVCodecError("truncated chunk")
            if tag >> 3 == 6:
                data = body[pos : pos + length]
                pos += length
                continue
            pos += length
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise KVCodecError(f"unsupported wire type {wire}")
        meta.append(body[start:pos])
    return None, pb.KVChunk.FromString(b"".join(meta)), data


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
        return self.kv_heads * self.num_tokens * self.head_dim * self.dtype.itemsize


def _where(chunk: pb.KVChunk) -> str:
    return f"layer {chunk.layer} {pb.TensorKind.Name(chunk.kind)} offset {chunk.offset}"


class Assembler:
    """Feeds on PullResponse messages in order; `result()` returns the SequenceKV once complete.

    Received bytes are copied at most once: a tensor that arrives in one chunk is kept as the
    received bytes themselves; one split over several chunks gets an uninitialized buffer of its
    final size (no zero-filling pass) and each chunk is copied in at its offset."""

    def __init__(self, expected: Expected) -> None:
        self.expected = expected
        self.header: pb.KVHeader | None = None
        # One per tensor, in (layer, key/value) order: received bytes, or a buffer being filled.
        self.buffers: list[memoryview] = []
        self.current = 0  # index of the tensor being filled
        self.filled = 0  # bytes of it received so far
        self.chunks = 0
        # Looked up once: feed_chunk runs per chunk, and its checks should cost nothing next to the data.
        self.dtype_name = dtype_name(expected.dtype)
        self.shape = expected.tensor_shape
        self.tensor_bytes = expected.tensor_bytes
        self.num_tensors = 2 * expected.num_layers

    def feed(self, message: pb.PullResponse) -> None:
        if message.WhichOneof("item") == "header":
            self.feed_header(message.header)
        else:
            self.feed_chunk(message.chunk, memoryview(message.chunk.data))

    def feed_wire(self, raw: bytes) -> None:
        header, chunk, data = split_wire(raw)
        if header is not None:
            self.feed_header(header)
        else:
            assert chunk is not None
            self.feed_chunk(chunk, data)

    def feed_header(self, header: pb.KVHeader) -> None:
        exp = self.expected
        if self.header is not None:
            raise KVCodecError("second header")
        if header.checksum_algorithm != CHECKSUM_ALGORITHM:
            # An older sender (CRC-32, field unset) or a newer one: refuse up front, clearly, instead
            # of failing every chunk's check as "corrupt".
            raise KVCodecError(
                f"sender checksums chunks with {algorithm_name(header.checksum_algorithm)}; this "
                f"receiver verifies only {algorithm_name(CHECKSUM_ALGORITHM)} (mismatched versions?)"
            )
        if header.num_layers != exp.num_layers or header.num_tokens != exp.num_tokens:
            raise KVCodecError(
                f"header says {header.num_layers} layers x {header.num_tokens} tokens, "
                f"expected {exp.num_layers} x {exp.num_tokens}"
            )
        if header.total_bytes != 2 * exp.num_layers * exp.tensor_bytes:
            raise KVCodecError(
                f"header says {header.total_bytes} bytes, expected {2 * exp.num_layers * exp.tensor_bytes}"
            )
        self.header = header

    def feed_chunk(self, chunk: pb.KVChunk, data: memoryview) -> None:
        exp = self.expected
        if self.header is None:
            raise KVCodecError("chunk before header")
        self.chunks += 1
        if len(data) > exp.max_chunk_bytes:
            raise KVCodecError(f"oversized chunk: {len(data)} bytes > limit {exp.max_chunk_bytes}")
        if self.current >= self.num_tensors:
            raise KVCodecError("more chunks than the cache holds")
        layer, kind = divmod(self.current, 2)
        # Chunks must arrive in order and tile each tensor exactly: a chunk at any other offset
        # (a gap, a repeat, an overlap) is refused, so every byte is written once and checked.
        if chunk.layer != layer or chunk.kind != KINDS[kind] or chunk.offset != self.filled:
            raise KVCodecError(
                f"out-of-order chunk ({_where(chunk)}), expected layer {layer} offset {self.filled}"
            )
        if chunk.dtype != self.dtype_name:
            raise KVCodecError(f"dtype {chunk.dtype!r} in {_where(chunk)}, expected {self.dtype_name!r}")
        if tuple(chunk.shape) != self.shape:
            raise KVCodecError(f"shape {tuple(chunk.shape)} in {_where(chunk)}, expected {self.shape}")
        end = self.filled + len(data)
        if end > self.tensor_bytes:
            raise KVCodecError(f"chunk overruns its tensor ({_where(chunk)})")
        if not data and self.tensor_bytes:
            raise KVCodecError(f"empty chunk ({_where(chunk)})")
        if checksum(data) != chunk.checksum:
            raise KVCodecError(
                f"corrupt chunk: checksum ({algorithm_name(CHECKSUM_ALGORITHM)}) mismatch in {_where(chunk)}"
            )
        if self.filled == 0 and end == self.tensor_bytes:
            self.buffers.append(data)  # the whole tensor in one chunk: keep the received bytes, no copy
        else:
            if self.filled == 0:
                # torch.empty, not bytearray(n): no pass zero-filling bytes that are overwritten anyway.
                self.buffers.append(memoryview(torch.empty(self.tensor_bytes, dtype=torch.uint8).numpy()))
            self.buffers[-1][self.filled : end] = data
        self.filled = end
        if self.filled == self.tensor_bytes:
            self.current += 1
            self.filled = 0

    def result(self) -> SequenceKV:
        exp = self.expected
        if self.header is None or self.current != 2 * exp.num_layers:
            raise KVCodecError(
                f"incomplete KV cache: {self.current} of {2 * exp.num_layers} tensors received"
            )
        with warnings.catch_warnings():
            # Whole-tensor chunks are read-only received bytes; the decode batch copies them before any write.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = [
                torch.frombuffer(buf, dtype=exp.dtype).reshape(exp.tensor_shape) for buf in self.buffers
            ]
        return SequenceKV([(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)])
