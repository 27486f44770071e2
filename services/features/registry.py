"""Feature views declared in a registry file (YAML).

A view is a named group of features of one entity type (user, item, ...), stored as one
packed little-endian record per entity so any number of entities is one MGET. The record
dtype, the default record and the column names all derive from the declaration here, so
the reader, the ingest step and the seed cannot disagree on a byte.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.limits import echo

# dtype names accepted in the registry -> little-endian numpy dtypes as stored in Redis.
DTYPES: Mapping[str, str] = {"float32": "<f4", "float64": "<f8", "int32": "<i4", "int64": "<i8"}
# Timestamped views end each record with the unix time the row was written.
TIMESTAMP_FIELD = "_written_at"
# Words used by the key layout itself (see layout.py), so no view may take them as its key.
# "seen" holds ranking's per-user seen-items sets (services/ranking/layout.py).
RESERVED_KEYS = frozenset({"meta", "current", "seq", "mat", "seen"})
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class RegistryError(ValueError):
    """The registry file is malformed; the message names the view and field."""


@dataclass(frozen=True)
class Feature:
    name: str
    dtype: str  # one of DTYPES
    length: int  # 1 for a scalar, n for a vector of n values
    default: tuple[float, ...]  # one per element

    @property
    def columns(self) -> list[str]:
        return [self.name] if self.length == 1 else [f"{self.name}[{i}]" for i in range(self.length)]


@dataclass(frozen=True, eq=False)
class FeatureView:
    name: str
    entity: str
    id_column: str  # entity id column in ingest files
    key: str  # short code in Redis keys: <prefix>:<key>:<entity id>
    features: tuple[Feature, ...]
    ttl_seconds: float  # 0: values never expire
    timestamped: bool

    def __post_init__(self) -> None:
        fields: list[tuple[Any, ...]] = [
            (f.name, DTYPES[f.dtype]) if f.length == 1 else (f.name, DTYPES[f.dtype], (f.length,))
            for f in self.features
        ]
        if self.timestamped:
            fields.append((TIMESTAMP_FIELD, "<f8"))
        record = np.dtype(fields)
        default = np.zeros(1, dtype=record)
        for f in self.features:
            default[f.name] = np.asarray(f.default if f.length > 1 else f.default[0])
        object.__setattr__(self, "record_dtype", record)
        object.__setattr__(self, "default_record", default.tobytes())
        object.__setattr__(self, "default_row", self.to_matrix(default)[0].copy())

    # Derived in __post_init__ from the declaration.
    record_dtype: np.dtype = field(init=False, repr=False)
    default_record: bytes = field(init=False, repr=False)
    default_row: np.ndarray = field(init=False, repr=False)  # float32 [width]

    @property
    def width(self) -> int:
        return sum(f.length for f in self.features)

    @property
    def columns(self) -> list[str]:
        return [f"{self.name}.{c}" for f in self.features for c in f.columns]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise RegistryError(f"view {self.name!r} has no feature {name!r}")

    def to_matrix(self, records: np.ndarray) -> np.ndarray:
        """float32 [len(records), width]: every feature column, in declaration order."""
        out = np.empty((len(records), self.width), dtype=np.float32)
        column = 0
        for f in self.features:
            out[:, column : column + f.length] = records[f.name].reshape(len(records), f.length)
            column += f.length
        return out


@dataclass(frozen=True)
class ReferenceSpec:
    """How the reference GetFeatures(user_id, item_ids) is composed for the ranker."""

    user_view: str
    item_view: str
    category_feature: str  # item category, handed to ranking
    # Without a pipeline file, the model row [user.vector, item.vector]; a pipeline file's
    # column mapping replaces it (services/features/model_inputs.py), so it may be left out.
    vector_feature: str | None = None


@dataclass(frozen=True)
class RetrievalSpec:
    """Which vectors the candidate index is built from and queried with."""

    user_view: str
    item_view: str
    vector_feature: str


@dataclass(frozen=True, eq=False)
class Registry:
    views: Mapping[str, FeatureView]
    reference: ReferenceSpec | None
    retrieval: RetrievalSpec | None

    def view(self, name: str) -> FeatureView:
        try:
            return self.views[name]
        except KeyError:
            known = ", ".join(sorted(self.views))
            raise NotFound(f"unknown feature view {echo(name)}; the registry declares: {known}") from None

    def resolve(self, names: list[str]) -> list[FeatureView]:
        """The views of one request, checked to share one entity type."""
        if not names:
            raise InvalidArgument("name at least one feature view")
        views = [self.view(n) for n in names]  # unknown names first: the rest are few, declared ones
        if len(set(names)) != len(names):
            repeated = next(name for i, name in enumerate(names) if name in names[:i])
            raise InvalidArgument(f"feature view {repeated!r} is repeated; name each view once")
        entities = {v.entity for v in views}
        if len(entities) > 1:
            raise InvalidArgument(f"views {names} mix entity types {sorted(entities)}; request one type at a time")
        return views


# ------------------------------------------------------------------------------ parsing


def _require(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in doc:
        raise RegistryError(f"{where}: missing {key!r}")
    return doc[key]


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise RegistryError(f"{where}: {value!r} is not a valid name (letters, digits, underscore)")
    return value


def _feature(doc: Any, where: str) -> Feature:
    if not isinstance(doc, Mapping):
        raise RegistryError(f"{where}: expected a mapping with name, dtype, shape, default")
    name = _name(_require(doc, "name", where), where)
    where = f"{where} ({name})"
    dtype = doc.get("dtype", "float32")
    if dtype not in DTYPES:
        raise RegistryError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    length = doc.get("shape", 1)
    if isinstance(length, list) and len(length) == 1:
        length = length[0]
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise RegistryError(f"{where}: shape must be a positive integer, got {length!r}")
    raw = doc.get("default", 0)
    values = raw if isinstance(raw, list) else [raw] * length
    if len(values) != length or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RegistryError(f"{where}: default must be a number or a list of {length} numbers")
    if not all(math.isfinite(v) for v in values):
        raise RegistryError(f"{where}: default values must be finite")
    if dtype.startswith("int") and not all(float(v).is_integer() for v in values):
        raise RegistryError(f"{where}: an {dtype} default must be an integer")
    return Feature(name=name, dtype=dtype, length=length, default=tuple(float(v) for v in values))


def _view(name: str, doc: Any, entities: Mapping[str, Any]) -> FeatureView:
    where = f"view {name!r}"
    if not isinstance(doc, Mapping):
        raise RegistryError(f"{where}: expected a mapping")
    entity = _require(doc, "entity", where)
    if entity not in entities:
        raise RegistryError(f"{where}: entity {entity!r} is not declared under `entities`")
    key = str(doc.get("key", name))
    if ":" in key or not key or key in RESERVED_KEYS:
        raise RegistryError(f"{where}: key {key!r} must be non-empty, without ':', not one of {sorted(RESERVED_KEYS)}")
    raw_features = _require(doc, "features", where)
    if not isinstance(raw_features, list) or not raw_features:
        raise RegistryError(f"{where}: features must be a non-empty list")
    features = tuple(_feature(f, f"{where} feature {i}") for i, f in enumerate(raw_features))
    names = [f.name for f in features]
    if len(set(names)) != len(names) or TIMESTAMP_FIELD in names:
        raise RegistryError(f"{where}: feature names must be unique (and not {TIMESTAMP_FIELD})")
    ttl = doc.get("ttl_seconds", 0)
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl < 0:
        raise RegistryError(f"{where}: ttl_seconds must be a number >= 0")
    timestamped = doc.get("timestamped", True)
    if not isinstance(timestamped, bool):
        raise RegistryError(f"{where}: timestamped must be true or false")
    if ttl and not timestamped:
        raise RegistryError(f"{where}: a ttl needs timestamped: true (the cache honours it per row)")
    id_column = (entities[entity] or {}).get("id_column", f"{entity}_id")
    return FeatureView(
        name=name,
        entity=entity,
        id_column=str(id_column),
        key=key,
        features=features,
        ttl_seconds=float(ttl),
        timestamped=timestamped,
    )


def parse_registry(doc: Any) -> Registry:
    if not isinstance(doc, Mapping):
        raise RegistryError("registry: expected a mapping with `entities` and `views`")
    entities = doc.get("entities") or {}
    if not isinstance(entities, Mapping):
        raise RegistryError("registry: `entities` must be a mapping")
    for entity in entities:
        _name(entity, "entities")
    raw_views = doc.get("views") or {}
    if not isinstance(raw_views, Mapping) or not raw_views:
        raise RegistryError("registry: `views` must declare at least one view")
    views = {_name(n, "views"): _view(n, v, entities) for n, v in raw_views.items()}
    keys = [v.key for v in views.values()]
    if len(set(keys)) != len(keys):
        raise RegistryError(f"registry: view keys must be unique, got {keys}")
    reference = None
    if doc.get("reference"):
        r = doc["reference"]
        reference = ReferenceSpec(
            user_view=_require(r, "user_view", "reference"),
            item_view=_require(r, "item_view", "reference"),
            category_feature=_require(r, "category_feature", "reference"),
            vector_feature=r.get("vector_feature"),
        )
        vector = [reference.vector_feature] if reference.vector_feature is not None else []
        _check_view_features(views, reference.user_view, vector, "reference")
        _check_view_features(views, reference.item_view, [*vector, reference.category_feature], "reference")
    retrieval = None
    if doc.get("retrieval"):
        r = doc["retrieval"]
        retrieval = RetrievalSpec(
            user_view=_require(r, "user_view", "retrieval"),
            item_view=_require(r, "item_view", "retrieval"),
            vector_feature=_require(r, "vector_feature", "retrieval"),
        )
        _check_view_features(views, retrieval.user_view, [retrieval.vector_feature], "retrieval")
        _check_view_features(views, retrieval.item_view, [retrieval.vector_feature], "retrieval")
        lengths = {
            views[v].feature(retrieval.vector_feature).length for v in (retrieval.user_view, retrieval.item_view)
        }
        if len(lengths) != 1:
            raise RegistryError("retrieval: user and item vectors must have the same length")
    return Registry(views=views, reference=reference, retrieval=retrieval)


def _check_view_features(views: Mapping[str, FeatureView], view: str, features: list[str], where: str) -> None:
    if view not in views:
        raise RegistryError(f"{where}: view {view!r} is not declared")
    for feature in features:
        views[view].feature(feature)


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at `path`, or the built-in one describing the reference workload."""
    if not path:
        return parse_registry(yaml.safe_load(REFERENCE_REGISTRY_YAML))
    source = Path(path)
    try:
        doc = yaml.safe_load(source.read_text())
    except OSError as error:
        raise RegistryError(f"cannot read registry {source}: {error}") from error
    except yaml.YAMLError as error:
        raise RegistryError(f"{source}: not valid YAML: {error}") from error
    try:
        return parse_registry(doc)
    except RegistryError as error:
        raise RegistryError(f"{source}: {error}") from None


# The built-in registry. Kept in code, not as a package data file, so that a plain
# (non-editable) install always has it; `infermesh features views --yaml` prints it as a
# starting point for a registry of your own (FEATURES_REGISTRY=path/to/views.yaml).
REFERENCE_REGISTRY_YAML = """\
# Feature views served by the features service (FEATURES_REGISTRY names another file).
#
# Each view is stored as one packed little-endian record per entity (one Redis value), so
# a request for any number of entities is one MGET. Per feature: dtype (float32, float64,
# int32, int64), shape (vector length, 1 by default) and the default served when a value
# is absent or Redis is unreachable. ttl_seconds (0: never) expires values per entity, in
# Redis and in the local cache; it needs timestamped: true, which appends the write time
# to each record and gives per-row freshness.
entities:
  user: {id_column: user_id}
  item: {id_column: item_id}

views:
  # The reference workload, as `infermesh seed` writes it (no per-row timestamp).
  user:
    entity: user
    key: u
    timestamped: false
    features:
      - {name: vec, dtype: float32, shape: 32, default: 0.0}
  item:
    entity: item
    key: i
    timestamped: false
    features:
      - {name: vec, dtype: float32, shape: 32, default: 0.0}
      - {name: category, dtype: int32, default: 0}
      - {name: price, dtype: float32, default: 0.0}

# GetFeatures(user_id, item_ids): rows [user.vec, item.vec] for the ranker, plus categories.
reference:
  user_view: user
  item_view: item
  vector_feature: vec
  category_feature: category

# Candidate retrieval: nearest items by inner product of user.vec and item.vec.
retrieval:
  user_view: user
  item_view: item
  vector_feature: vec
"""
