from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Prompt(_message.Message):
    __slots__ = ("request_id", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillBatch(_message.Message):
    __slots__ = ("prompts", "seq", "hidden_shape")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SHAPE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    seq: int
    hidden_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., seq: _Optional[int] = ..., hidden_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchOp(_message.Message):
    __slots__ = ("remove_row", "add_request")
    REMOVE_ROW_FIELD_NUMBER: _ClassVar[int]
    ADD_REQUEST_FIELD_NUMBER: _ClassVar[int]
    remove_row: int
    add_request: str
    def __init__(self, remove_row: _Optional[int] = ..., add_request: _Optional[str] = ...) -> None: ...

class DecodeStep(_message.Message):
    __slots__ = ("ops", "last_tokens", "new_batch", "seq", "lane", "hidden_shape")
    OPS_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[BatchOp]
    last_tokens: _containers.RepeatedScalarFieldContainer[int]
    new_batch: bool
    seq: int
    lane: int
    hidden_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ops: _Optional[_Iterable[_Union[BatchOp, _Mapping]]] = ..., last_tokens: _Optional[_Iterable[int]] = ..., new_batch: _Optional[bool] = ..., seq: _Optional[int] = ..., lane: _Optional[int] = ..., hidden_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class KVSource(_message.Message):
    __slots__ = ("address", "head_start", "head_end", "layer_start", "layer_end")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    address: str
    head_start: int
    head_end: int
    layer_start: int
    layer_end: int
    def __init__(self, address: _Optional[str] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class PullKV(_message.Message):
    __slots__ = ("request_id", "num_tokens", "sources")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    sources: _containers.RepeatedCompositeFieldContainer[KVSource]
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[KVSource, _Mapping]]] = ...) -> None: ...

class Pulled(_message.Message):
    __slots__ = ("bytes", "seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankDescription(_message.Message):
    __slots__ = ("rank", "device", "parameters", "kv_capacity_tokens", "address", "kv_head_start", "kv_head_end")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_END_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: str
    parameters: int
    kv_capacity_tokens: int
    address: str
    kv_head_start: int
    kv_head_end: int
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[str] = ..., parameters: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., address: _Optional[str] = ..., kv_head_start: _Optional[int] = ..., kv_head_end: _Optional[int] = ...) -> None: ...
