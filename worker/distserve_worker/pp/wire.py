"""Hidden states between pipeline stages: raw tensor bytes in protobuf chunks, each checked.

A forward is one client stream (`StageService.Forward`): a `ForwardHeader` (what to run, and the
tensor's shape, dtype, byte count and chunk count), then the tensor's bytes in chunks of at most
`max_chunk_bytes`, each with its XXH3-64. The receiver checks order, sizes and checksums and
rebuilds the tensor without ever unpickling anything.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import torch

from distserve_protos.stage.v1 import stage_pb2 as pb
from distserve_worker.kvtransfer.codec import checksum, dtype_from_name, dtype_name, tensor_bytes


class StageWireError(ValueError):
    """The received stream is not a well-formed forward (a bug or corruption; the message says which)."""


def forward_messages(
    header: pb.ForwardHeader, hidden: torch.Tensor, max_chunk_bytes: int
) -> Iterator[pb.ForwardChunk]:
    """The header (shape, dtype and sizes filled in) and the tensor's chunks."""
    raw = tensor_bytes(hidden)
    count = max(1, -(-len(raw) // max_chunk_bytes))
    header.shape[:] = list(hidden.shape)
    header.dtype = dtype_name(hidden.dtype)
    header.nbytes = len(raw)
    header.chunks = count
    yield pb.ForwardChunk(header=header)
    for index in range(count):
        data = bytes(raw[index * max_chunk_bytes : (index + 1) * max_chunk_bytes])
        yield pb.ForwardChunk(chunk=pb.TensorChunk(index=index, data=data, xxh3_64=checksum(data)))


async def read_forward(
    stream: AsyncIterator[pb.ForwardChunk], max_bytes: int
) -> tuple[pb.ForwardHeader, torch.Tensor]:
    """The header and the hidden states of one forward; StageWireError if the stream is malformed."""
    header: pb.ForwardHeader | None = None
    buffer = bytearray()
    expected = 0
    async for message in stream:
        if message.HasField("header"):
            if header is not None:
                raise StageWireError("a second header in one forward")
            header = message.header
            if header.nbytes > max_bytes:
                raise StageWireError(
                    f"hidden states of {header.nbytes} bytes exceed this stage's {max_bytes}"
                )
            continue
        if header is None:
            raise StageWireError("a chunk before the header")
        chunk = message.chunk
        if chunk.index != expected:
            raise StageWireError(f"chunk {chunk.index} arrived where chunk {expected} was due")
        if checksum(chunk.data) != chunk.xxh3_64:
            raise StageWireError(f"chunk {chunk.index} of the hidden states fails its XXH3-64 checksum")
        buffer += chunk.data
        expected += 1
        if len(buffer) > header.nbytes:
            raise StageWireError(f"more than the announced {header.nbytes} bytes")
    if header is None:
        raise StageWireError("an empty forward (no header)")
    if expected != header.chunks or len(buffer) != header.nbytes:
        raise StageWireError(
            f"{expected} chunks / {len(buffer)} bytes arrived; {header.chunks} / {header.nbytes} were announced"
        )
    try:
        dtype = dtype_from_name(header.dtype)
    except ValueError as exc:
        raise StageWireError(str(exc)) from exc
    shape = tuple(int(d) for d in header.shape)
    tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
    if tensor.numel() != (int(torch.tensor(shape).prod()) if shape else 1):
        raise StageWireError(
            f"{len(buffer)} bytes do not make a {header.dtype} tensor of shape {list(shape)}"
        )
    return header, tensor.reshape(shape)
