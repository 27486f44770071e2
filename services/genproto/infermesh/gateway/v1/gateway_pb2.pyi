from google.api import annotations_pb2 as _annotations_pb2
from services.genproto.infermesh.ranking.v1 import ranking_pb2 as _ranking_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "candidate_ids", "k", "retrieve_candidates", "explain", "offset")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    retrieve_candidates: int
    explain: bool
    offset: int
    def __init__(self, user_id: _Optional[str] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., retrieve_candidates: _Optional[int] = ..., explain: bool = ..., offset: _Optional[int] = ...) -> None: ...

class RecommendedItem(_message.Message):
    __slots__ = ("item_id", "score", "category")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    category: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., category: _Optional[int] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "milliseconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    milliseconds: float
    def __init__(self, stage: _Optional[str] = ..., milliseconds: _Optional[float] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_name", "model_version", "trace_id", "stage_timings", "unknown_items", "degraded", "degraded_reasons", "experiment_arm", "explanations", "total_items")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_ARM_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RecommendedItem]
    model_name: str
    model_version: str
    trace_id: str
    stage_timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    unknown_items: int
    degraded: bool
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    experiment_arm: str
    explanations: _containers.RepeatedCompositeFieldContainer[_ranking_pb2.ItemExplanation]
    total_items: int
    def __init__(self, items: _Optional[_Iterable[_Union[RecommendedItem, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., trace_id: _Optional[str] = ..., stage_timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., unknown_items: _Optional[int] = ..., degraded: bool = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., experiment_arm: _Optional[str] = ..., explanations: _Optional[_Iterable[_Union[_ranking_pb2.ItemExplanation, _Mapping]]] = ..., total_items: _Optional[int] = ...) -> None: ...
