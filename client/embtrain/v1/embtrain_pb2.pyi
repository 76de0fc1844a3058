from google.protobuf import struct_pb2 as _struct_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LossSpec(_message.Message):
    __slots__ = ("name", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ReturnOptions(_message.Message):
    __slots__ = ("gradient", "triplets", "max_triplets", "per_item_losses")
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    TRIPLETS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIPLETS_FIELD_NUMBER: _ClassVar[int]
    PER_ITEM_LOSSES_FIELD_NUMBER: _ClassVar[int]
    gradient: bool
    triplets: bool
    max_triplets: int
    per_item_losses: bool
    def __init__(self, gradient: _Optional[bool] = ..., triplets: _Optional[bool] = ..., max_triplets: _Optional[int] = ..., per_item_losses: _Optional[bool] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("request_id", "session_id", "loss", "inputs", "options", "step", "rank")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_id: str
    loss: LossSpec
    inputs: _containers.MessageMap[str, Tensor]
    options: ReturnOptions
    step: int
    rank: int
    def __init__(self, request_id: _Optional[str] = ..., session_id: _Optional[str] = ..., loss: _Optional[_Union[LossSpec, _Mapping]] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., options: _Optional[_Union[ReturnOptions, _Mapping]] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("request_id", "loss", "gradients", "triplets", "triplets_total", "triplets_truncated", "per_item_losses", "stats", "step", "error", "triplet_ids", "row_offset")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    TRIPLETS_FIELD_NUMBER: _ClassVar[int]
    TRIPLETS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRIPLETS_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    PER_ITEM_LOSSES_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRIPLET_IDS_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    loss: float
    gradients: _containers.MessageMap[str, Tensor]
    triplets: Tensor
    triplets_total: int
    triplets_truncated: bool
    per_item_losses: Tensor
    stats: _containers.ScalarMap[str, float]
    step: int
    error: _status_pb2.Status
    triplet_ids: Tensor
    row_offset: int
    def __init__(self, request_id: _Optional[str] = ..., loss: _Optional[float] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ..., triplets: _Optional[_Union[Tensor, _Mapping]] = ..., triplets_total: _Optional[int] = ..., triplets_truncated: _Optional[bool] = ..., per_item_losses: _Optional[_Union[Tensor, _Mapping]] = ..., stats: _Optional[_Mapping[str, float]] = ..., step: _Optional[int] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., triplet_ids: _Optional[_Union[Tensor, _Mapping]] = ..., row_offset: _Optional[int] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("loss", "head", "optimizer", "memory", "seed", "initial_state", "group_size", "group_timeout", "replicated", "shard")
    class InitialStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    REPLICATED_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    loss: LossSpec
    head: _struct_pb2.Value
    optimizer: _struct_pb2.Struct
    memory: _struct_pb2.Struct
    seed: int
    initial_state: _containers.MessageMap[str, Tensor]
    group_size: int
    group_timeout: float
    replicated: bool
    shard: bool
    def __init__(self, loss: _Optional[_Union[LossSpec, _Mapping]] = ..., head: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., optimizer: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., memory: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., seed: _Optional[int] = ..., initial_state: _Optional[_Mapping[str, Tensor]] = ..., group_size: _Optional[int] = ..., group_timeout: _Optional[float] = ..., replicated: _Optional[bool] = ..., shard: _Optional[bool] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "config", "step", "parameter_count", "memory_fill", "memory_size", "last_checkpoint_step", "last_checkpoint_time", "optimizer_state", "status", "status_message", "device", "created_time")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FILL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_TIME_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    step: int
    parameter_count: int
    memory_fill: int
    memory_size: int
    last_checkpoint_step: int
    last_checkpoint_time: float
    optimizer_state: _struct_pb2.Struct
    status: str
    status_message: str
    device: str
    created_time: float
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., step: _Optional[int] = ..., parameter_count: _Optional[int] = ..., memory_fill: _Optional[int] = ..., memory_size: _Optional[int] = ..., last_checkpoint_step: _Optional[int] = ..., last_checkpoint_time: _Optional[float] = ..., optimizer_state: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., status: _Optional[str] = ..., status_message: _Optional[str] = ..., device: _Optional[str] = ..., created_time: _Optional[float] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "keep_checkpoint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keep_checkpoint: bool
    def __init__(self, session_id: _Optional[str] = ..., keep_checkpoint: _Optional[bool] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("session_id", "embeddings")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    embeddings: Tensor
    def __init__(self, session_id: _Optional[str] = ..., embeddings: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportModelResponse(_message.Message):
    __slots__ = ("config_json", "weights", "state", "step")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    weights: bytes
    state: _containers.MessageMap[str, Tensor]
    step: int
    def __init__(self, config_json: _Optional[str] = ..., weights: _Optional[bytes] = ..., state: _Optional[_Mapping[str, Tensor]] = ..., step: _Optional[int] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("name", "required", "dtype", "shape", "differentiable", "description", "dtypes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    name: str
    required: bool
    dtype: str
    shape: str
    differentiable: bool
    description: str
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    def __init__(self, name: _Optional[str] = ..., required: _Optional[bool] = ..., dtype: _Optional[str] = ..., shape: _Optional[str] = ..., differentiable: _Optional[bool] = ..., description: _Optional[str] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ...) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "type", "default", "range", "choices", "description", "default_number")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default: _struct_pb2.Value
    range: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    description: str
    default_number: float
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., range: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., default_number: _Optional[float] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "description", "inputs", "params", "mines_triplets", "stateful", "family")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MINES_TRIPLETS_FIELD_NUMBER: _ClassVar[int]
    STATEFUL_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    inputs: _containers.RepeatedCompositeFieldContainer[InputInfo]
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    mines_triplets: bool
    stateful: bool
    family: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[InputInfo, _Mapping]]] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ..., mines_triplets: _Optional[bool] = ..., stateful: _Optional[bool] = ..., family: _Optional[str] = ...) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...
