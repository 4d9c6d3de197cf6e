"""Benchmark: pulling a 64 MiB KV cache over gRPC (our transport) vs the same bytes over a raw TCP socket.

Both servers run in a child process on loopback and hold the cache of a SmolLM2-135M-shaped request
(30 layers, 3 KV heads, head dim 64, float32; 1,456 tokens = 64 MiB). The gRPC side is the real
path: the prefill's buffer holds the cache encoded as a prefill worker stores it (chunks with
CRC-32, encoded once when stored, not timed here), the KVTransferServicer streams them, and the
decode's GrpcKVPuller checks every CRC and assembles tensors (timed). The socket side only moves the bytes (sendall / recv_into).

    .venv/bin/python benchmarks/runtime_kv_transfer.py [--runs 7] [--chunk-mib 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import torch

LAYERS, HEADS, DIM, TOKENS = 30, 3, 64, 1456
MiB = 1024 * 1024


def make_kv():
    from distserve_worker.engine.kvcache import SequenceKV

    g = torch.Generator().manual_seed(0)
    return SequenceKV(
        [
            (torch.randn(HEADS, TOKENS, DIM, generator=g), torch.randn(HEADS, TOKENS, DIM, generator=g))
            for _ in range(LAYERS)
        ]
    )


def serve(chunk_bytes: int) -> None:
    """Child process: gRPC KV transfer server + raw socket server over the same bytes; prints ports."""
    import grpc

    from distserve_worker.kvtransfer.buffer import KVBuffer
    from distserve_worker.kvtransfer.codec import encode_cache, tensor_bytes
    from distserve_worker.kvtransfer.transport import KVTransferServicer, add_to_server, channel_options

    kv = make_kv()
    raw = b"".join(bytes(tensor_bytes(t)) for layer in kv.layers for t in layer)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def socket_loop() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(raw)

    threading.Thread(target=socket_loop, daemon=True).start()

    async def main() -> None:
        buffer = KVBuffer(1 << 34, ttl_seconds=1e9)
        await buffer.reserve("bench", kv.nbytes)
        encoded = encode_cache("bench", kv, chunk_bytes)
        buffer.store("bench", encoded, encoded.nbytes)
        server = grpc.aio.server(options=channel_options(chunk_bytes))
        add_to_server(KVTransferServicer(buffer, chunk_bytes), server)
        # The ceiling: the same bytes as plain gRPC messages (no protobuf, no CRC, no assembly).
        pieces = [raw[i : i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)]

        async def raw_pull(request: bytes, context: object) -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        handler = grpc.unary_stream_rpc_method_handler(
            raw_pull, request_deserializer=_same, response_serializer=_same
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Raw", {"Pull": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"grpc": port, "socket": listener.getsockname()[1], "bytes": len(raw)}), flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def _same(raw: bytes) -> bytes:
    return raw


async def raw_grpc_pulls(port: int, chunk_bytes: int, runs: int) -> list[float]:
    import grpc

    from distserve_worker.kvtransfer.transport import channel_options

    times = []
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=channel_options(chunk_bytes)
    ) as channel:
        pull = channel.unary_stream("/bench.Raw/Pull", request_serializer=_same, response_deserializer=_same)
        for _ in range(runs + 1):
            started = time.perf_counter()
            async for _piece in pull(b""):
                pass
            times.append(time.perf_counter() - started)
    return times[1:]


def socket_pull(port: int, nbytes: int) -> float:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while got < nbytes:
            n = s.recv_into(view[got:], nbytes - got)
            if n == 0:
                raise RuntimeError("socket closed early")
            got += n
    return time.perf_counter() - started


async def grpc_pulls(port: int, chunk_bytes: int, runs: int) -> list[float]:
    from distserve_worker.kvtransfer.codec import Expected
    from distserve_worker.kvtransfer.transport import GrpcKVPuller

    puller = GrpcKVPuller(chunk_bytes)
    expected = Expected(LAYERS, TOKENS, HEADS, DIM, torch.float32, chunk_bytes)
    times = []
    try:
        for _ in range(runs + 1):  # the first one opens the channel: not counted
            started = time.perf_counter()
            kv = await puller.pull(f"127.0.0.1:{port}", "bench", expected, timeout=120)
            times.append(time.perf_counter() - started)
            assert kv.num_tokens == TOKENS
    finally:
        await puller.close()
    return times[1:]


def measure(runs: int, chunk_mib: float) -> dict[str, float]:
    chunk = int(chunk_mib * MiB)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--chunk-mib", str(chunk_mib)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ports = json.loads(child.stdout.readline())
        nbytes = ports["bytes"]
        socket_pull(ports["socket"], nbytes)  # warm-up
        sock = statistics.median(socket_pull(ports["socket"], nbytes) for _ in range(runs))
        grpc_t = statistics.median(asyncio.run(grpc_pulls(ports["grpc"], chunk, runs)))
        raw_t = statistics.median(asyncio.run(raw_grpc_pulls(ports["grpc"], chunk, runs)))
    finally:
        child.kill()
        child.wait(timeout=10)
    return {
        "bytes": nbytes,
        "chunk_mib": chunk_mib,
        "socket_seconds": sock,
        "grpc_seconds": grpc_t,
        "socket_MiB_per_s": nbytes / MiB / sock,
        "grpc_MiB_per_s": nbytes / MiB / grpc_t,
        "ratio": sock / grpc_t,
        "raw_grpc_seconds": raw_t,
        "raw_grpc_ratio": sock / raw_t,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--chunk-mib", type=float, default=2.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.chunk_mib * MiB))
        return
    r = measure(args.runs, args.chunk_mib)
    print(
        f"KV pull of {r['bytes'] / MiB:.1f} MiB on loopback (median of {args.runs}): "
        f"gRPC {r['grpc_seconds'] * 1000:.0f} ms = {r['grpc_MiB_per_s']:.0f} MiB/s, "
        f"raw socket {r['socket_seconds'] * 1000:.0f} ms = {r['socket_MiB_per_s']:.0f} MiB/s, "
        f"gRPC reaches {100 * r['ratio']:.0f}% of socket throughput (chunk {args.chunk_mib} MiB); "
        f"plain gRPC bytes without protobuf/CRC: {100 * r['raw_grpc_ratio']:.0f}%"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
