from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetFeaturesRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "views", "entity_ids")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    ENTITY_IDS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    views: _containers.RepeatedScalarFieldContainer[str]
    entity_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., views: _Optional[_Iterable[str]] = ..., entity_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DenseMatrix(_message.Message):
    __slots__ = ("data", "rows", "columns", "datatype", "name")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    rows: int
    columns: int
    datatype: str
    name: str
    def __init__(self, data: _Optional[bytes] = ..., rows: _Optional[int] = ..., columns: _Optional[int] = ..., datatype: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetFeaturesResponse(_message.Message):
    __slots__ = ("model_input", "item_categories", "item_present", "missing_items", "features", "columns", "present", "freshness_seconds", "degraded", "user_columns", "inputs")
    MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    ITEM_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ITEM_PRESENT_FIELD_NUMBER: _ClassVar[int]
    MISSING_ITEMS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    USER_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model_input: DenseMatrix
    item_categories: bytes
    item_present: bytes
    missing_items: int
    features: DenseMatrix
    columns: _containers.RepeatedScalarFieldContainer[str]
    present: bytes
    freshness_seconds: bytes
    degraded: bool
    user_columns: int
    inputs: _containers.RepeatedCompositeFieldContainer[DenseMatrix]
    def __init__(self, model_input: _Optional[_Union[DenseMatrix, _Mapping]] = ..., item_categories: _Optional[bytes] = ..., item_present: _Optional[bytes] = ..., missing_items: _Optional[int] = ..., features: _Optional[_Union[DenseMatrix, _Mapping]] = ..., columns: _Optional[_Iterable[str]] = ..., present: _Optional[bytes] = ..., freshness_seconds: _Optional[bytes] = ..., degraded: bool = ..., user_columns: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[DenseMatrix, _Mapping]]] = ...) -> None: ...

class RetrieveCandidatesRequest(_message.Message):
    __slots__ = ("user_id", "count")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    count: int
    def __init__(self, user_id: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class RetrieveCandidatesResponse(_message.Message):
    __slots__ = ("item_ids", "scores", "degraded")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: bytes
    degraded: bool
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[bytes] = ..., degraded: bool = ...) -> None: ...

class GetFeaturesBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GetFeaturesRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[GetFeaturesRequest, _Mapping]]] = ...) -> None: ...

class GetFeaturesBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GetFeaturesResult]
    def __init__(self, results: _Optional[_Iterable[_Union[GetFeaturesResult, _Mapping]]] = ...) -> None: ...

class GetFeaturesResult(_message.Message):
    __slots__ = ("features", "status")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    features: GetFeaturesResponse
    status: _status_pb2.Status
    def __init__(self, features: _Optional[_Union[GetFeaturesResponse, _Mapping]] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
