from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "prompt_tokens", "kv_bytes", "kv_address", "prefill_seconds", "queue_seconds", "kv_rank_addresses", "kv_stages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_RANK_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    KV_STAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    prompt_tokens: int
    kv_bytes: int
    kv_address: str
    prefill_seconds: float
    queue_seconds: float
    kv_rank_addresses: _containers.RepeatedScalarFieldContainer[str]
    kv_stages: _containers.RepeatedCompositeFieldContainer[KVStage]
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_address: _Optional[str] = ..., prefill_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., kv_rank_addresses: _Optional[_Iterable[str]] = ..., kv_stages: _Optional[_Iterable[_Union[KVStage, _Mapping]]] = ...) -> None: ...

class KVStage(_message.Message):
    __slots__ = ("layer_start", "layer_end", "ranks")
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    layer_start: int
    layer_end: int
    ranks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., ranks: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "kv_address", "prompt_tokens", "first_token_id", "sampling", "max_tokens", "stop", "ignore_eos", "kv_rank_addresses", "kv_stages")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    KV_RANK_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    KV_STAGES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv_address: str
    prompt_tokens: int
    first_token_id: int
    sampling: SamplingParams
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    kv_rank_addresses: _containers.RepeatedScalarFieldContainer[str]
    kv_stages: _containers.RepeatedCompositeFieldContainer[KVStage]
    def __init__(self, request_id: _Optional[str] = ..., kv_address: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., first_token_id: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., kv_rank_addresses: _Optional[_Iterable[str]] = ..., kv_stages: _Optional[_Iterable[_Union[KVStage, _Mapping]]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("request_id", "token_id", "text", "index", "finish_reason", "kv_transfer_seconds", "kv_transfer_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    text: str
    index: int
    finish_reason: FinishReason
    kv_transfer_seconds: float
    kv_transfer_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., kv_transfer_seconds: _Optional[float] = ..., kv_transfer_bytes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("role", "model", "queued", "running", "free_slots", "kv_used_bytes", "kv_capacity_bytes", "kv_entries", "max_context", "ready", "tp", "pp", "stage", "layer_start", "layer_end", "ranks", "address", "stages", "broken", "draining")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BROKEN_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    role: str
    model: str
    queued: int
    running: int
    free_slots: int
    kv_used_bytes: int
    kv_capacity_bytes: int
    kv_entries: int
    max_context: int
    ready: bool
    tp: int
    pp: int
    stage: int
    layer_start: int
    layer_end: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    address: str
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    broken: str
    draining: bool
    def __init__(self, role: _Optional[str] = ..., model: _Optional[str] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., free_slots: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_capacity_bytes: _Optional[int] = ..., kv_entries: _Optional[int] = ..., max_context: _Optional[int] = ..., ready: _Optional[bool] = ..., tp: _Optional[int] = ..., pp: _Optional[int] = ..., stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ..., address: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., broken: _Optional[str] = ..., draining: _Optional[bool] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage", "layer_start", "layer_end", "address", "ready", "ranks")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    layer_start: int
    layer_end: int
    address: str
    ready: bool
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    def __init__(self, stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., address: _Optional[str] = ..., ready: _Optional[bool] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ...) -> None: ...

class RankInfo(_message.Message):
    __slots__ = ("rank", "device", "parameters", "kv_capacity_tokens", "ready", "address", "kv_head_start", "kv_head_end")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_START_FIELD_NUMBER: _ClassVar[int]
    KV_HEAD_END_FIELD_NUMBER: _ClassVar[int]
    rank: int
    device: str
    parameters: int
    kv_capacity_tokens: int
    ready: bool
    address: str
    kv_head_start: int
    kv_head_end: int
    def __init__(self, rank: _Optional[int] = ..., device: _Optional[str] = ..., parameters: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., ready: _Optional[bool] = ..., address: _Optional[str] = ..., kv_head_start: _Optional[int] = ..., kv_head_end: _Optional[int] = ...) -> None: ...
