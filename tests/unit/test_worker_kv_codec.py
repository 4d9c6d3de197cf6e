"""KV codec: tensors -> chunk messages -> tensors, byte for byte, and rejection of bad chunks."""

import pytest
import torch
import xxhash

from distserve_protos.kvtransfer.v1 import kvtransfer_pb2 as pb
from distserve_worker.engine.kvcache import SequenceKV
from distserve_worker.kvtransfer.codec import (
    Assembler,
    Expected,
    KVCodecError,
    encode,
    encode_wire,
    split_wire,
)

CHUNK0_XXH3 = 17904910546364380078


def make_kv(layers=3, heads=2, tokens=5, dim=4, dtype=torch.float32, seed=0) -> SequenceKV:
    g = torch.Generator().manual_seed(seed)
    return SequenceKV(
        [
            (
                torch.randn(heads, tokens, dim, generator=g).to(dtype),
                torch.randn(heads, tokens, dim, generator=g).to(dtype),
            )
            for _ in range(layers)
        ]
    )


def expected_for(kv: SequenceKV, max_chunk: int) -> Expected:
    k = kv.layers[0][0]
    return Expected(len(kv.layers), k.shape[1], k.shape[0], k.shape[2], k.dtype, max_chunk)


def roundtrip(kv: SequenceKV, chunk: int) -> SequenceKV:
    asm = Assembler(expected_for(kv, chunk))
    for message in encode("r1", kv, chunk):
        asm.feed(pb.PullResponse.FromString(message.SerializeToString()))
    return asm.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_roundtrip_is_bit_exact(dtype, chunk):
    kv = make_kv(dtype=dtype)
    out = roundtrip(kv, chunk)
    for (k1, v1), (k2, v2) in zip(kv.layers, out.layers, strict=True):
        assert k2.dtype == dtype
        assert k1.view(torch.uint8).flatten().tolist() == k2.contiguous().view(torch.uint8).flatten().tolist()
        assert torch.equal(v1.view(torch.uint8), v2.view(torch.uint8))


def test_chunks_carry_raw_little_endian_bytes_and_xxh3_64():
    kv = SequenceKV([(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, -0.0]]]))])
    messages = list(encode("r1", kv, 4))
    header = messages[0].header
    assert (header.num_layers, header.num_tokens, header.total_bytes, header.num_chunks) == (1, 1, 16, 4)
    assert header.checksum_algorithm == pb.CHECKSUM_ALGORITHM_XXH3_64
    chunks = [m.chunk for m in messages[1:]]
    assert [c.data for c in chunks] == [
        b"\x00\x00\x80\x3f",
        b"\x00\x00\x00\x40",
        b"\x00\x00\x40\x40",
        b"\x00\x00\x00\x80",
    ]
    assert [c.offset for c in chunks] == [0, 4, 0, 4]
    assert [c.kind for c in chunks] == [pb.TENSOR_KIND_KEY] * 2 + [pb.TENSOR_KIND_VALUE] * 2
    assert all(c.checksum == xxhash.xxh3_64_intdigest(c.data) and list(c.shape) == [1, 1, 2] for c in chunks)
    # XXH3-64 (seed 0) of 1.0f32's bytes, pinned so the wire value cannot drift with the library.
    assert chunks[0].checksum == CHUNK0_XXH3


def feed_all(messages, expected):
    asm = Assembler(expected)
    for m in messages:
        asm.feed(m)
    return asm.result()


def test_corrupt_chunk_is_rejected():
    kv = make_kv()
    messages = list(encode("r1", kv, 32))
    messages[3].chunk.data = bytes([messages[3].chunk.data[0] ^ 1]) + messages[3].chunk.data[1:]
    with pytest.raises(KVCodecError, match=r"checksum .*XXH3_64.* mismatch"):
        feed_all(messages, expected_for(kv, 32))


@pytest.mark.parametrize("chunk_size", [32, 1 << 20])  # a split tensor, and a whole-tensor chunk
def test_any_flipped_bit_or_wrong_checksum_is_rejected(chunk_size):
    kv = make_kv()
    clean = list(encode("r1", kv, chunk_size))
    size = len(clean[1].chunk.data)
    for bit in (0, 7, 8 * size - 1):
        messages = list(encode("r1", kv, chunk_size))
        data = bytearray(messages[1].chunk.data)
        data[bit // 8] ^= 1 << (bit % 8)
        messages[1].chunk.data = bytes(data)
        with pytest.raises(KVCodecError, match="checksum"):
            feed_all(messages, expected_for(kv, chunk_size))
    messages = list(encode("r1", kv, chunk_size))
    messages[1].chunk.checksum ^= 1
    with pytest.raises(KVCodecError, match="checksum"):
        feed_all(messages, expected_for(kv, chunk_size))


@pytest.mark.parametrize("algorithm", [pb.CHECKSUM_ALGORITHM_UNSPECIFIED, 7])
def test_other_checksum_algorithm_is_refused_at_the_header(algorithm):
    # An older sender (CRC-32 only, the field left unset) or an unknown algorithm fails clearly,
    # before any chunk, not as "corrupt chunk".
    kv = make_kv()
    messages = list(encode("r1", kv, 32))
    messages[0].header.checksum_algorithm = algorithm
    with pytest.raises(
        KVCodecError, match=r"sender checksums chunks with .*verifies only CHECKSUM_ALGORITHM_XXH3_64"
    ):
        feed_all(messages, expected_for(kv, 32))


def test_version_1_crc32_field_is_gone():
    # Field 7 (the CRC-32) is reserved: never reused, so an old reader cannot mistake a new value for it.
    assert "crc32" not in pb.KVChunk.DESCRIPTOR.fields_by_name
    assert pb.KVChunk.DESCRIPTOR.fields_by_name["checksum"].number == 8
    assert all(f.number != 7 for f in pb.KVChunk.DESCRIPTOR.fields)


def test_chunk_at_a_wrong_offset_or_overlapping_is_rejected():
    kv = make_kv(tokens=9)  # 2 heads x 9 tokens x 4 floats = 288 bytes: 9 chunks of 32 per tensor
    exp = expected_for(kv, 32)
    for offset in (0, 16, 31, 33, 64, 1 << 40):  # repeat, overlap, gap, beyond the tensor
        messages = list(encode("r1", kv, 32))
        assert messages[2].chunk.offset == 32
        messages[2].chunk.offset = offset
        with pytest.raises(KVCodecError, match="out-of-order"):
            feed_all(messages, exp)
    messages = list(encode("r1", kv, 32))
    with pytest.raises(KVCodecError, match="out-of-order"):  # the same chunk twice
        feed_all([*messages[:3], messages[2], *messages[3:]], exp)


def test_empty_or_overrunning_chunk_is_rejected():
    kv = make_kv(tokens=9)
    exp = expected_for(kv, 32)
    messages = list(encode("r1", kv, 32))
    messages[1].chunk.data = b""
    messages[1].chunk.checksum = xxhash.xxh3_64_intdigest(b"")
    with pytest.raises(KVCodecError, match="empty chunk"):
        feed_all(messages, exp)
    messages = list(encode("r1", kv, 32))
    last = messages[9].chunk  # the key tensor's last chunk (bytes 256..288): make it run past 288
    assert last.offset == 256
    last.data = last.data + b"\0" * 8
    last.checksum = xxhash.xxh3_64_intdigest(last.data)
    with pytest.raises(KVCodecError, match="overruns"):
        feed_all(messages, expected_for(kv, 64))  # within the size limit, past the tensor's end


def test_oversized_chunk_is_rejected():
    kv = make_kv()
    with pytest.raises(KVCodecError, match="oversized chunk"):
        feed_all(list(encode("r1", kv, 64)), expected_for(kv, 32))


def test_wrong_shape_dtype_or_order_is_rejected():
    kv = make_kv()
    exp = expected_for(kv, 32)
    with pytest.raises(KVCodecError, match="header says"):
        feed_all(list(encode("r1", make_kv(tokens=6), 32)), exp)
    with pytest.raises(KVCodecError, match="dtype"):
        feed_all(list(encode("r1", make_kv(dtype=torch.float64, dim=2), 32)), exp)
    messages = list(encode("r1", kv, 32))
    messages[1], messages[2] = messages[2], messages[1]
    with pytest.raises(KVCodecError, match="out-of-order"):
        feed_all(messages, exp)


def test_missing_or_extra_chunks_are_rejected():
    kv = make_kv()
    exp = expected_for(kv, 32)
    messages = list(encode("r1", kv, 32))
    with pytest.raises(KVCodecError, match="incomplete"):
        feed_all(messages[:-1], exp)
    with pytest.raises(KVCodecError, match="more chunks"):
        feed_all([*messages, messages[-1]], exp)
    with pytest.raises(KVCodecError, match="before header"):
        feed_all(messages[1:], exp)


def test_wire_encoding_is_protobufs_own_serialization():
    kv = make_kv(tokens=7)
    for raw in encode_wire("r1", kv, 40):
        message = pb.PullResponse.FromString(raw)
        assert message.SerializeToString() == raw
        header, chunk, data = split_wire(raw)
        if message.WhichOneof("item") == "header":
            assert header == message.header and chunk is None
        else:
            assert bytes(data) == message.chunk.data and chunk.data == b""
            chunk.data = bytes(data)
            assert chunk == message.chunk


def test_wire_roundtrip_through_the_zero_copy_path():
    kv = make_kv(tokens=9)
    for chunk_size in (13, 1 << 20):  # split tensors, and one chunk per tensor (kept without a copy)
        asm = Assembler(expected_for(kv, chunk_size))
        for raw in encode_wire("r1", kv, chunk_size):
            asm.feed_wire(raw)
        out = asm.result()
        assert all(
            torch.equal(a, b)
            for la, lb in zip(kv.layers, out.layers, strict=True)
            for a, b in zip(la, lb, strict=True)
        )


def test_truncated_wire_message_is_rejected():
    raw = list(encode_wire("r1", make_kv(), 32))[1]
    with pytest.raises(KVCodecError):
        split_wire(raw[:-3])
