"""The committed protobuf code matches the .proto files (what `make check-protos` enforces)."""

import shutil
from pathlib import Path

from distserve_worker import protogen


def test_committed_generated_code_is_up_to_date():
    assert protogen.stale_files(protogen.protos_root()) == []


def test_check_names_the_stale_files_after_a_proto_edit(tmp_path: Path):
    root = tmp_path / "protos"
    shutil.copytree(protogen.protos_root(), root)
    proto = root / "distserve_protos/kvtransfer/v1/kvtransfer.proto"
    proto.write_text(
        proto.read_text().replace("bool released = 1;", "bool released = 1;\n  string note = 2;")
    )
    stale = protogen.stale_files(root)
    assert "distserve_protos/kvtransfer/v1/kvtransfer_pb2.py" in stale
    assert all("generation" not in name for name in stale)


def test_messages_are_protobuf_not_pickle():
    from distserve_protos.kvtransfer.v1 import kvtransfer_pb2 as pb

    chunk = pb.KVChunk(layer=1, kind=pb.TENSOR_KIND_VALUE, dtype="float32", shape=[2, 3, 4], data=b"\x00" * 8)
    assert pb.KVChunk.FromString(chunk.SerializeToString()) == chunk
    assert pb.DESCRIPTOR.package == "distserve.kvtransfer.v1"
