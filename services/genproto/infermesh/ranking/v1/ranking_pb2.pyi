from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("item_ids", "scores", "item_categories", "item_present", "k", "max_per_category")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    ITEM_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ITEM_PRESENT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    scores: bytes
    item_categories: bytes
    item_present: bytes
    k: int
    max_per_category: int
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., scores: _Optional[bytes] = ..., item_categories: _Optional[bytes] = ..., item_present: _Optional[bytes] = ..., k: _Optional[int] = ..., max_per_category: _Optional[int] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "category")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    category: int
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., category: _Optional[int] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ...) -> None: ...
