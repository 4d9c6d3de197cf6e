from distserve_protos.generation.v1 import generation_pb2 as _generation_pb2
from distserve_protos.rank.v1 import rank_pb2 as _rank_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Prompt(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class PrefillWork(_message.Message):
    __slots__ = ("prompts",)
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ...) -> None: ...

class RowOp(_message.Message):
    __slots__ = ("remove_row", "add")
    REMOVE_ROW_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    remove_row: int
    add: AddRow
    def __init__(self, remove_row: _Optional[int] = ..., add: _Optional[_Union[AddRow, _Mapping]] = ...) -> None: ...

class AddRow(_message.Message):
    __slots__ = ("request_id", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sampling: _generation_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class DecodeWork(_message.Message):
    __slots__ = ("lane", "ops", "new_batch", "sample_index")
    LANE_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    NEW_BATCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    lane: int
    ops: _containers.RepeatedCompositeFieldContainer[RowOp]
    new_batch: bool
    sample_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, lane: _Optional[int] = ..., ops: _Optional[_Iterable[_Union[RowOp, _Mapping]]] = ..., new_batch: _Optional[bool] = ..., sample_index: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardHeader(_message.Message):
    __slots__ = ("prefill", "decode", "shape", "dtype", "nbytes", "chunks")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    prefill: PrefillWork
    decode: DecodeWork
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    nbytes: int
    chunks: int
    def __init__(self, prefill: _Optional[_Union[PrefillWork, _Mapping]] = ..., decode: _Optional[_Union[DecodeWork, _Mapping]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., nbytes: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("index", "data", "xxh3_64")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    XXH3_64_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    xxh3_64: int
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., xxh3_64: _Optional[int] = ...) -> None: ...

class ForwardChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ForwardHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[ForwardHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StagePull(_message.Message):
    __slots__ = ("request_id", "num_tokens", "sources")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    sources: _containers.RepeatedCompositeFieldContainer[_generation_pb2.KVStage]
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[_generation_pb2.KVStage, _Mapping]]] = ...) -> None: ...

class DescribeStageRequest(_message.Message):
    __slots__ = ("leader_id",)
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    def __init__(self, leader_id: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("leader_id",)
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    def __init__(self, leader_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageDescription(_message.Message):
    __slots__ = ("stage", "layer_start", "layer_end", "tp", "address", "ready", "broken", "ranks", "boot_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    stage: int
    layer_start: int
    layer_end: int
    tp: int
    address: str
    ready: bool
    broken: str
    ranks: _containers.RepeatedCompositeFieldContainer[_generation_pb2.RankInfo]
    boot_id: str
    def __init__(self, stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., tp: _Optional[int] = ..., address: _Optional[str] = ..., ready: _Optional[bool] = ..., broken: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[_generation_pb2.RankInfo, _Mapping]]] = ..., boot_id: _Optional[str] = ...) -> None: ...
