from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("item_ids", "scores", "item_categories", "item_present", "k", "max_per_category", "user_id", "item_embeddings", "embedding_dim", "offset", "explain")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ITEM_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ITEM_PRESENT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: bytes
    item_categories: bytes
    item_present: bytes
    k: int
    max_per_category: int
    user_id: str
    item_embeddings: bytes
    embedding_dim: int
    offset: int
    explain: bool
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[bytes] = ..., item_categories: _Optional[bytes] = ..., item_present: _Optional[bytes] = ..., k: _Optional[int] = ..., max_per_category: _Optional[int] = ..., user_id: _Optional[str] = ..., item_embeddings: _Optional[bytes] = ..., embedding_dim: _Optional[int] = ..., offset: _Optional[int] = ..., explain: bool = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "category")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    category: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., category: _Optional[int] = ...) -> None: ...

class StageEffect(_message.Message):
    __slots__ = ("stage", "effect", "rank_before", "rank_after", "detail")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    RANK_BEFORE_FIELD_NUMBER: _ClassVar[int]
    RANK_AFTER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    effect: str
    rank_before: int
    rank_after: int
    detail: str
    def __init__(self, stage: _Optional[str] = ..., effect: _Optional[str] = ..., rank_before: _Optional[int] = ..., rank_after: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class ItemExplanation(_message.Message):
    __slots__ = ("item_id", "effects")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EFFECTS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    effects: _containers.RepeatedCompositeFieldContainer[StageEffect]
    def __init__(self, item_id: _Optional[str] = ..., effects: _Optional[_Iterable[_Union[StageEffect, _Mapping]]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items", "explanations", "total_items", "skipped_stages", "item_embeddings_unused")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STAGES_FIELD_NUMBER: _ClassVar[int]
    ITEM_EMBEDDINGS_UNUSED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    explanations: _containers.RepeatedCompositeFieldContainer[ItemExplanation]
    total_items: int
    skipped_stages: _containers.RepeatedScalarFieldContainer[str]
    item_embeddings_unused: bool
    def __init__(self, items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., explanations: _Optional[_Iterable[_Union[ItemExplanation, _Mapping]]] = ..., total_items: _Optional[int] = ..., skipped_stages: _Optional[_Iterable[str]] = ..., item_embeddings_unused: bool = ...) -> None: ...

class RankBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RankRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[RankRequest, _Mapping]]] = ...) -> None: ...

class RankBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RankResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RankResult, _Mapping]]] = ...) -> None: ...

class RankResult(_message.Message):
    __slots__ = ("response", "status")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    response: RankResponse
    status: _status_pb2.Status
    def __init__(self, response: _Optional[_Union[RankResponse, _Mapping]] = ..., status: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
