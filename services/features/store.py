"""Feature retrieval: any views for any entities from Redis in one round trip, behind a local cache.

Transport-agnostic: the gRPC servicer converts at the edge; this module knows Redis and
numpy only.

A read goes: local cache (fresh hits answer at once) -> coalescing (a key another request
is already reading is awaited, not read again) -> one MGET of the remaining keys plus the
views' pointer keys. If Redis is slow or down (or the circuit breaker is open), stale cache
entries and then the views' defaults answer instead and the result is flagged degraded.
A batch of reference-form requests (get_many) is one such read: its users, then all its
item ids in request order (a key several requests share is still read from Redis once); each
request is then a slice of it, flagged on its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, auto
from itertools import chain, compress, repeat
from typing import Any, Final, cast

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import Counter

from services.features.cache import LocalCache, Lookup
from services.features.layout import entity_key_prefix, meta_key, pointer_key
from services.features.model_inputs import InputLayout, RequestLayout, reference_layout
from services.features.registry import TIMESTAMP_FIELD, FeatureView, ReferenceSpec, Registry, load_registry
from services.runtime.breaker import CircuitBreaker
from services.runtime.errors import FailedPrecondition, InfermeshError, InvalidArgument, NotFound, Unavailable
from services.runtime.limits import (
    DEFAULT_MAX_ID_LENGTH,
    check_length,
    check_lengths,
    echo,
    length_error,
    lengths_error,
)
from services.runtime.metrics import Metrics
from services.runtime.telemetry import (
    ATTR_CACHE_HIT,
    ATTR_CACHE_HITS,
    ATTR_CACHE_MISSES,
    ATTR_DB_NAMESPACE,
    ATTR_DB_OPERATION,
    ATTR_DB_SYSTEM,
    ATTR_FEATURES_KEYS,
    ATTR_SERVER_ADDRESS,
    ATTR_SERVER_PORT,
    SPAN_FEATURES_CACHE_LOOKUP,
    SPAN_REDIS_MGET,
    SpanKind,
    child_span,
    record_span,
)


class _Signal(Enum):
    """Results a key's in-flight future can carry besides the value itself."""

    RETRY = auto()  # the reader saw the view re-materialized (or was cancelled): read again
    FAILED = auto()  # the reader could not reach Redis: fall back


_RETRY: Final = _Signal.RETRY
_FAILED: Final = _Signal.FAILED
# What a key's in-flight read answers: its value (None: no such key) or a signal.
_Fetched = bytes | None | _Signal
# A read re-starts at most this many times when views switch materialization under it.
_MAX_ATTEMPTS = 3
# Background reads (pointer refresh, probes) never wait longer than this.
_BACKGROUND_TIMEOUT = 1.0
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)


class _RedisDown(Exception):
    pass


class _Restart(Exception):
    pass


# (part, row, key, the key's in-flight Redis read): one row a read still has to fill.
_Claim = tuple[int, int, str, asyncio.Future[_Fetched]]


@dataclass(eq=False)
class _Part:
    """One view's rows in a read, in request order: what the local cache held, then what
    Redis (or a fall-back) filled in. Arrays, so no step walks the rows in Python."""

    view: FeatureView
    ids: Sequence[str]
    prefix: str  # the materialization the keys were built for
    head: str  # every key of the part is head + entity id
    records: np.ndarray  # view.record_dtype [n]
    present: np.ndarray  # bool [n]
    stale: np.ndarray  # bool [n]: a cache entry past fresh_until, kept to fall back on
    expires_at: np.ndarray  # float64 [n]: the stale entry's TTL (unix seconds)
    fell_back: np.ndarray  # bool [n]: served without Redis
    bad_layout: bool = False  # Redis held a record of another size than the view declares

    @classmethod
    def cached(cls, view: FeatureView, ids: Sequence[str], prefix: str, hit: Lookup) -> _Part:
        head = entity_key_prefix(prefix, view.key)
        stale = hit.live & ~hit.fresh
        fell_back = np.zeros(len(ids), dtype=bool)
        return cls(view, ids, prefix, head, hit.records, hit.present, stale, hit.expires_at, fell_back)

    def fill(self, rows: list[int], values: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """These rows from Redis values; returns them packed: (records, present, the values of
        the declared layout, which the cache may keep)."""
        records, present, ok = _pack(self.view, values)
        at = np.asarray(rows, dtype=np.intp)
        np.put(self.records, at, records)  # (several times faster than records[at] = for records)
        self.present[at] = present & ok
        self.bad_layout = self.bad_layout or not ok.all()
        return records, present, ok

    def fall_back(self, rows: list[int], now: float) -> int:
        """Rows Redis did not answer: a stale entry within its TTL stays, else the default
        (not present); the rows are flagged. How many stale entries stood in."""
        at = np.asarray(rows, dtype=np.intp)
        self.fell_back[at] = True
        kept = self.stale[at] & (self.expires_at[at] > now)
        self.present[at[~kept]] = False
        return int(kept.sum())


@dataclass(eq=False)
class _Read:
    """One attempt at a read: each part's rows so far, and the keys left to read."""

    parts: list[_Part] = field(default_factory=list)
    owned: list[_Claim] = field(default_factory=list)  # this read fetches them, for every waiter
    owned_ends: list[int] = field(default_factory=list)  # per part: its claims end here in owned
    waiting: list[_Claim] = field(default_factory=list)  # another request (or an earlier row) fetches them
    mine: dict[str, asyncio.Future[_Fetched]] = field(default_factory=dict)  # the keys owned, by key
    repeats: int = 0  # waiting rows whose key this read fetches itself (a key asked twice)


@dataclass(frozen=True)
class RowsTensor:
    """One named model input of a request: rows x columns little-endian values."""

    name: str
    datatype: str  # OIP: FP32, INT64, ...
    data: bytes
    columns: int


@dataclass(frozen=True)
class FeatureRows:
    """Model-ready rows for one request, all as little-endian bytes in request order."""

    # [user vector, item vector] float32 rows (the pipeline's fallback vectors): the model's
    # one input too when `inputs` is empty (then named model_input_name).
    model_input: bytes
    rows: int
    item_categories: bytes  # int32 per row
    item_present: bytes  # uint8 per row
    missing_items: int
    columns: int = 0
    degraded: bool = False
    # The leading columns of each row that hold the user's features; the rest are the item's.
    user_columns: int = 0
    model_input_name: str = ""
    # The model's inputs as the pipeline maps columns to them; empty: model_input is its input.
    inputs: tuple[RowsTensor, ...] = ()


@dataclass(frozen=True, eq=False)
class ViewRows:
    """One view's part of a read, in request order; absent rows hold the view's defaults."""

    view: FeatureView
    records: np.ndarray  # view.record_dtype [n]
    present: np.ndarray  # bool [n]
    age_seconds: np.ndarray  # float32 [n]; inf where absent, NaN where unknown
    # bool [n]: rows Redis did not answer (a stale cache entry or the default stands in), so
    # a batch of requests read together can tell which of them was served degraded.
    fell_back: np.ndarray

    @property
    def degraded(self) -> bool:
        return bool(self.fell_back.any())


@dataclass(frozen=True)
class ViewFeatures:
    matrix: bytes  # float32 [rows, len(columns)] row-major
    rows: int
    columns: list[str]
    present: bytes  # uint8 [rows, views]
    freshness_seconds: bytes  # float32 [rows, views]
    degraded: bool


@dataclass(frozen=True, eq=False)
class StoreMetrics:
    lookups: Counter  # tier=local|redis, result=hit|miss
    coalesced: Counter
    fallback_rows: Counter  # source=stale|default
    degraded: Counter
    redis_errors: Counter  # kind=timeout|connection|circuit_open
    round_trips: Counter
    switches: Counter

    @classmethod
    def create(cls, metrics: Metrics) -> StoreMetrics:
        p = metrics.service
        return cls(
            lookups=metrics.counter(f"{p}_cache_lookups", "Entity lookups per cache tier", ["tier", "result"]),
            coalesced=metrics.counter(f"{p}_coalesced_reads", "Entity reads served by another request's Redis read"),
            fallback_rows=metrics.counter(
                f"{p}_fallback_rows", "Rows served without Redis: stale cache entries or view defaults", ["source"]
            ),
            degraded=metrics.counter(f"{p}_degraded_responses", "Reads answered in degraded mode"),
            redis_errors=metrics.counter(f"{p}_redis_errors", "Redis reads that failed or were skipped", ["kind"]),
            round_trips=metrics.counter(f"{p}_redis_round_trips", "Redis round trips made by reads"),
            switches=metrics.counter(f"{p}_materialization_switches", "View materialization switches observed"),
        )


class Versions:
    """Which materialization each view serves, and when each one was written."""

    def __init__(self, root: str, views: Sequence[str]) -> None:
        self.root = root
        self._prefix = {name: root for name in views}
        self._pointer = {name: pointer_key(root, name) for name in views}
        self.materialized_at: dict[str, float] = {}

    def prefix(self, view: str) -> str:
        return self._prefix[view]

    def pointer(self, view: str) -> str:
        return self._pointer[view]

    def decode(self, raw: bytes | None) -> str:
        return raw.decode() if raw else self.root

    def set(self, view: str, prefix: str) -> bool:
        changed = self._prefix[view] != prefix
        self._prefix[view] = prefix
        return changed

    def current(self) -> dict[str, str]:
        return dict(self._prefix)


def _parse_time(raw: bytes | None) -> float | None:
    """Materialization time from a meta document: `materialized_at` (unix) or `created_at` (ISO)."""
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("materialized_at"), (int, float)):
        return float(doc["materialized_at"])
    try:
        return datetime.fromisoformat(str(doc["created_at"])).timestamp()
    except (KeyError, ValueError):
        return None


class FeatureStore:
    """Reads feature views from Redis.

    Without a breaker, a Redis failure raises Unavailable (the plain store the monolith
    baseline uses); with one, reads degrade to the cache and defaults instead.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        max_items: int,
        *,
        registry: Registry | None = None,
        cache: LocalCache | None = None,
        breaker: CircuitBreaker | None = None,
        metrics: StoreMetrics | None = None,
        redis_timeout: float = 1.0,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        layout: RequestLayout | None = None,
    ) -> None:
        self._redis = client
        self.namespace = namespace
        self._max_items = max_items
        self._max_id_length = max_id_length
        self.registry = registry if registry is not None else load_registry()
        # How reference rows fill the model's inputs: the pipeline file's mapping, else the
        # registry's reference vectors as one FP32 input (model_inputs.py).
        self.layout = layout if layout is not None else reference_layout(self.registry)
        self.cache = cache if cache is not None else LocalCache(0, 0.0)  # (an empty cache is falsy)
        self.breaker = breaker
        self.metrics = metrics if metrics is not None else StoreMetrics.create(Metrics("features"))
        self.versions = Versions(namespace, list(self.registry.views))
        self._redis_timeout = redis_timeout
        self._inflight: dict[str, asyncio.Future[_Fetched]] = {}
        self.catalog_seen = False

    # ------------------------------------------------------------------ public reads

    async def get(self, user_id: str, item_ids: Sequence[str], timeout: float | None = None) -> FeatureRows:
        """Reference form: rows [user vector, item vector] per item for the ranker."""
        (outcome,) = await self.get_many([(user_id, item_ids)], timeout)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def get_many(
        self, requests: Sequence[tuple[str, Sequence[str]]], timeout: float | None = None
    ) -> list[FeatureRows | Exception]:
        """get() for many (user_id, item_ids) requests at once, each answered (or failed) as
        get() would answer it alone, in request order. One read for all, each key read from
        Redis once, so at most one Redis round trip."""
        rejections = [self._reference_error(u, ids) for u, ids in requests]
        batch = [request for request, rejection in zip(requests, rejections, strict=True) if rejection is None]
        built: list[FeatureRows | Exception] = []
        if batch:
            try:
                built = await self._reference_rows(batch, timeout)
            except FailedPrecondition as error:
                # A record of the wrong layout fails only the requests that read it, as it would
                # alone: each request read on its own (an error path, never a hot one).
                built = [error] if len(batch) == 1 else [(await self.get_many([r], timeout))[0] for r in batch]
            except InfermeshError as error:  # the store unreachable or re-materializing: for all
                built = [error] * len(batch)
        answers = iter(built)  # one per request of the batch, in its order
        return [rejection if rejection is not None else next(answers) for rejection in rejections]

    def _reference_error(self, user_id: str, item_ids: Sequence[str]) -> InfermeshError | None:
        """What is wrong with a reference-form request on its own, before any read."""
        if not user_id:
            return InvalidArgument("user_id is required")
        if len(item_ids) > self._max_items:
            return InvalidArgument(f"at most {self._max_items} item_ids per request, got {len(item_ids)}")
        too_long = length_error("user_id", user_id, self._max_id_length) or lengths_error(
            "item_ids", item_ids, self._max_id_length
        )
        if too_long is not None:
            return too_long
        if "" in item_ids:
            return InvalidArgument(f"item_ids[{item_ids.index('')}] is empty; every item needs an id")
        if self.registry.reference is None:
            return FailedPrecondition("the feature registry declares no `reference` views")
        if self.layout is None:
            return FailedPrecondition("no pipeline file maps features to the model's inputs")
        return None

    async def _reference_rows(
        self, requests: Sequence[tuple[str, Sequence[str]]], timeout: float | None
    ) -> list[FeatureRows | Exception]:
        """One read of the requests' users (row r: request r's) and their item ids laid end
        to end (request r's: one slice), then each request's rows. Not deduplicated here: the
        read claims a repeated key once, and the warm path needs no per-id dict."""
        reference, layout = self.registry.reference, self.layout
        assert reference is not None and layout is not None  # _reference_error checked them
        users = [user for user, _ in requests]
        items = list(chain.from_iterable(ids for _, ids in requests))
        views = self.registry.views
        read = await self._read(
            [(views[v], users) for v in layout.user_views] + [(views[v], items) for v in layout.item_views], timeout
        )
        parts = _Parts(
            dict(zip(layout.user_views, read, strict=False)),
            dict(zip(layout.item_views, read[len(layout.user_views) :], strict=False)),
        )
        built: list[FeatureRows | Exception] = []
        end = 0
        for r, (user_id, item_ids) in enumerate(requests):
            at = slice(end, end + len(item_ids))
            end = at.stop
            try:
                built.append(_assemble(reference, layout, parts, r, user_id, at))
            except Exception as error:  # noqa: BLE001 (a bug fails its own request; the caller reports it)
                built.append(error)
        degraded = sum(isinstance(rows, FeatureRows) and rows.degraded for rows in built)
        if degraded:
            self.metrics.degraded.inc(degraded)
        return built

    async def get_views(
        self, view_names: list[str], entity_ids: list[str], timeout: float | None = None
    ) -> ViewFeatures:
        """View form: one float32 matrix of the views' columns, plus presence and freshness."""
        views = self.registry.resolve(view_names)
        if not entity_ids:
            raise InvalidArgument("entity_ids must list at least one entity")
        self._check_count(len(entity_ids), "entity_ids")
        check_lengths("entity_ids", entity_ids, self._max_id_length)
        if "" in entity_ids:
            raise InvalidArgument("entity_ids must not contain empty ids")
        parts = await self.read([(view, entity_ids) for view in views], timeout)
        n = len(entity_ids)
        matrix = np.empty((n, sum(v.width for v in views)), dtype="<f4")
        column = 0
        for part in parts:
            matrix[:, column : column + part.view.width] = part.view.to_matrix(part.records)
            column += part.view.width
        return ViewFeatures(
            matrix=matrix.tobytes(),
            rows=n,
            columns=[c for v in views for c in v.columns],
            present=np.stack([p.present for p in parts], axis=1).astype(np.uint8).tobytes(),
            freshness_seconds=np.stack([p.age_seconds for p in parts], axis=1).astype("<f4").tobytes(),
            degraded=any(p.degraded for p in parts),
        )

    async def vector(
        self, view: FeatureView, feature: str, entity_id: str, timeout: float | None = None
    ) -> tuple[np.ndarray, bool]:
        """One entity's vector feature (float32) and whether it was served degraded."""
        if not entity_id:
            raise InvalidArgument(f"{view.entity} id is required")
        check_length(f"{view.entity}_id", entity_id, self._max_id_length)
        (part,) = await self.read([(view, [entity_id])], timeout)
        if not part.present[0] and not part.degraded:
            raise NotFound(f"unknown {view.entity} {echo(entity_id)}")
        return part.records[feature].reshape(-1).astype(np.float32), part.degraded

    async def read(
        self, parts: Sequence[tuple[FeatureView, Sequence[str]]], timeout: float | None = None
    ) -> list[ViewRows]:
        """Each (view, ids) in request order; at most one Redis round trip of this request's own."""
        result = await self._read(parts, timeout)
        if any(part.degraded for part in result):
            self.metrics.degraded.inc()
        return result

    async def _read(
        self, parts: Sequence[tuple[FeatureView, Sequence[str]]], timeout: float | None = None
    ) -> list[ViewRows]:
        """read(), leaving the count of degraded responses to the caller (a batch counts each)."""
        # Never spend more than half the caller's remaining time on Redis: the rest answers degraded.
        budget = self._redis_timeout if timeout is None else min(self._redis_timeout, 0.5 * timeout)
        for _ in range(_MAX_ATTEMPTS):
            try:
                result = await self._read_once(parts, time.monotonic() + max(budget, 0.0))
            except _Restart:
                continue
            return result
        raise Unavailable("feature views were re-materialized repeatedly during the read; retry")

    # ------------------------------------------------------------------ maintenance

    async def refresh(self) -> None:
        """Follow the views' pointer keys and learn when each serving materialization was written."""
        deadline = time.monotonic() + min(self._redis_timeout, _BACKGROUND_TIMEOUT)
        names = list(self.registry.views)
        raw = await self._mget([self.versions.pointer(n) for n in names], deadline)
        for name, value in zip(names, raw, strict=False):
            self._follow(self.registry.views[name], self.versions.decode(value))
        unknown = sorted(set(self.versions.current().values()) - set(self.versions.materialized_at))
        if unknown:
            for prefix, doc in zip(unknown, await self._mget([meta_key(p) for p in unknown], deadline), strict=False):
                when = _parse_time(doc)
                if when is not None:
                    self.versions.materialized_at[prefix] = when
        required = self._required_views()
        self.catalog_seen = self.catalog_seen or all(
            self.versions.prefix(v) in self.versions.materialized_at for v in required
        )

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(min(self._redis_timeout, _BACKGROUND_TIMEOUT)):
                await self._redis.ping()
        except _REDIS_ERRORS:
            return False
        return True

    def missing_catalog(self) -> list[str]:
        return [v for v in self._required_views() if self.versions.prefix(v) not in self.versions.materialized_at]

    # ------------------------------------------------------------------ internals

    def _required_views(self) -> list[str]:
        ref = self.registry.reference
        return [ref.user_view, ref.item_view] if ref else list(self.registry.views)

    def _check_count(self, n: int, what: str) -> None:
        if n > self._max_items:
            raise InvalidArgument(f"at most {self._max_items} {what} per request, got {n}")

    def _mget_span_attributes(self, keys: int) -> dict[str, Any]:
        kwargs = getattr(getattr(self._redis, "connection_pool", None), "connection_kwargs", {})
        return {
            ATTR_DB_SYSTEM: "redis",
            ATTR_DB_OPERATION: "MGET",
            ATTR_DB_NAMESPACE: str(kwargs.get("db", 0)),
            ATTR_SERVER_ADDRESS: str(kwargs.get("host", "")),
            ATTR_SERVER_PORT: int(kwargs.get("port", 0) or 0),
            ATTR_FEATURES_KEYS: keys,
        }

    async def _mget(self, keys: list[str], deadline: float) -> list[bytes | None]:
        if self.breaker is not None and not self.breaker.allow():
            self.metrics.redis_errors.labels("circuit_open").inc()
            raise _RedisDown("circuit open")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.metrics.redis_errors.labels("timeout").inc()
            raise _RedisDown("no time left for Redis")
        self.metrics.round_trips.inc()
        try:
            async with asyncio.timeout(remaining):
                with child_span(SPAN_REDIS_MGET, self._mget_span_attributes(len(keys)), kind=SpanKind.CLIENT):
                    reply = await self._redis.mget(keys)
        except _REDIS_ERRORS as error:
            timed_out = isinstance(error, (TimeoutError, redis.exceptions.TimeoutError))
            self.metrics.redis_errors.labels("timeout" if timed_out else "connection").inc()
            if self.breaker is not None:
                self.breaker.record_failure()
            raise _RedisDown(f"{type(error).__name__}: {error}") from error
        if self.breaker is not None:
            self.breaker.record_success()
        # The client decodes nothing (no decode_responses): a value is bytes, whatever the
        # library's return type (bytes | str) allows.
        return cast("list[bytes | None]", reply)

    def _follow(self, view: FeatureView, serving: str) -> None:
        """Serve materialization `serving` of the view from now on; the cached entries of the
        one it replaces can never be read again, so they go at once."""
        replaced = self.versions.prefix(view.name)
        if self.versions.set(view.name, serving):
            self.metrics.switches.inc()
            self.cache.drop(entity_key_prefix(replaced, view.key))

    async def _read_once(self, parts: Sequence[tuple[FeatureView, Sequence[str]]], deadline: float) -> list[ViewRows]:
        """One attempt: the local cache, then one MGET of this read's own misses and the views'
        pointers, then the keys other requests were already reading. _Restart when a view
        switched materialization under it."""
        read = self._claim_keys(parts)
        if read.owned:
            await self._fetch_owned(read, deadline)
        if read.waiting:
            await self._await_others(read, deadline)
        wall = time.time()
        return [self._rows(part, wall) for part in read.parts]

    def _claim_keys(self, parts: Sequence[tuple[FeatureView, Sequence[str]]]) -> _Read:
        """Fresh local cache entries answer at once (one vectorised lookup per view); every
        other key is claimed for this read to fetch (owned), or awaited from the request
        already fetching it (waiting)."""
        read = _Read()
        lookup_started = time.perf_counter_ns()
        for view, ids in parts:
            prefix = self.versions.prefix(view.name)
            hit = self.cache.lookup(entity_key_prefix(prefix, view.key), view.record_dtype, ids)
            read.parts.append(_Part.cached(view, ids, prefix, hit))
            self._claim(read, len(read.parts) - 1, np.flatnonzero(~hit.fresh).tolist())
            read.owned_ends.append(len(read.owned))
        self._count_lookups(read, sum(len(ids) for _, ids in parts), lookup_started)
        return read

    def _claim(self, read: _Read, p: int, rows: list[int]) -> None:
        """The cache misses (and stale rows) of part p: each key is fetched by this read, or
        awaited from the read already fetching it. (Only here does a read touch keys one by one.)"""
        inflight, loop, part = self._inflight, asyncio.get_running_loop(), read.parts[p]
        for j in rows:
            key = part.head + part.ids[j]
            future = inflight.get(key)
            if future is None:
                future = inflight[key] = read.mine[key] = loop.create_future()
                read.owned.append((p, j, key, future))
            else:
                read.waiting.append((p, j, key, future))
                if read.mine.get(key) is future:
                    read.repeats += 1

    def _count_lookups(self, read: _Read, lookups: int, started_ns: int) -> None:
        misses = len(read.owned) + len(read.waiting)
        if self.cache.enabled:
            record_span(
                SPAN_FEATURES_CACHE_LOOKUP,
                started_ns,
                time.perf_counter_ns(),
                {ATTR_CACHE_HIT: misses == 0, ATTR_CACHE_HITS: lookups - misses, ATTR_CACHE_MISSES: misses},
            )
            self.metrics.lookups.labels("local", "hit").inc(lookups - misses)
            self.metrics.lookups.labels("local", "miss").inc(misses)
        if len(read.waiting) > read.repeats:
            self.metrics.coalesced.inc(len(read.waiting) - read.repeats)

    async def _fetch_owned(self, read: _Read, deadline: float) -> None:
        """The one Redis round trip: the views' pointers and this read's own keys; whatever
        happens, every request waiting on those keys is answered."""
        pointers = [self.versions.pointer(part.view.name) for part in read.parts]
        try:
            reply = await self._mget(pointers + [key for _, _, key, _ in read.owned], deadline)
        except _RedisDown as error:
            for *_, future in read.owned:
                future.set_result(_FAILED)
            if self.breaker is None:
                raise Unavailable(f"feature store unreachable: {error}") from None
            self._fall_back(read, [(p, j) for p, j, _, _ in read.owned])
        else:
            self._check_pointers(read, reply[: len(pointers)])
            self._keep_fetched(read, reply[len(pointers) :])
        finally:
            for _, _, key, future in read.owned:
                if not future.done():  # cancelled mid-read: waiters read for themselves
                    future.set_result(_RETRY)
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    def _check_pointers(self, read: _Read, pointers: list[bytes | None]) -> None:
        """_Restart (waiters too) if a view now serves another materialization than the keys
        were built for: the reply mixes nothing, but it is of one no longer served."""
        moved = False
        for part, raw in zip(read.parts, pointers, strict=False):
            serving = self.versions.decode(raw)
            if serving != part.prefix:
                moved = True
                self._follow(part.view, serving)
        if moved:
            for *_, future in read.owned:
                future.set_result(_RETRY)
            raise _Restart

    def _keep_fetched(self, read: _Read, fetched: list[bytes | None]) -> None:
        """The fetched values: to the waiters, into the read's rows, into the local cache."""
        for (*_, future), value in zip(read.owned, fetched, strict=False):
            future.set_result(value)
        found, start = 0, 0
        for part, end in zip(read.parts, read.owned_ends, strict=False):
            if end > start:
                rows = [j for _, j, _, _ in read.owned[start:end]]
                records, present, ok = part.fill(rows, fetched[start:end])
                found += int(present.sum())
                if not ok.all():  # a record of the wrong layout is not kept
                    rows, records, present = list(compress(rows, ok)), records[ok], present[ok]
                self._cache_put(part, rows, records, present)
            start = end
        self.metrics.lookups.labels("redis", "hit").inc(found)
        self.metrics.lookups.labels("redis", "miss").inc(len(read.owned) - found)

    def _cache_put(self, part: _Part, rows: list[int], records: np.ndarray, present: np.ndarray) -> None:
        """Fetched rows into the local cache, each valid up to the view's TTL from its write time."""
        if not self.cache.enabled:
            return
        view = part.view
        if view.ttl_seconds:
            expires_at = np.where(present, records[TIMESTAMP_FIELD] + view.ttl_seconds, math.inf)
        else:
            expires_at = np.full(len(rows), math.inf)
        self.cache.put_many(part.head, list(map(part.ids.__getitem__, rows)), records, present, expires_at)

    async def _await_others(self, read: _Read, deadline: float) -> None:
        """The keys other requests were reading: their values, or a fall-back where that read
        failed or outlasts this read's deadline; _Restart where it saw a view switch."""
        pending = {future for *_, future in read.waiting if not future.done()}
        remaining = deadline - time.monotonic()
        if pending and remaining > 0:
            await asyncio.wait(pending, timeout=remaining)
        got: dict[int, tuple[list[int], list[bytes | None]]] = {}
        failed: list[tuple[int, int]] = []
        for p, j, _, future in read.waiting:
            result = future.result() if future.done() else _FAILED
            if result is _RETRY:
                raise _Restart
            if result is _FAILED:
                failed.append((p, j))
            else:
                rows, values = got.setdefault(p, ([], []))
                rows.append(j)
                values.append(result)
        for p, (rows, values) in got.items():
            read.parts[p].fill(rows, values)
        if failed:
            self._fall_back(read, failed)

    def _fall_back(self, read: _Read, rows: list[tuple[int, int]]) -> None:
        """Rows (part, row) Redis did not answer: stale cache entries within the view's TTL,
        else the view's default; the rows are flagged. Without a breaker: Unavailable."""
        if self.breaker is None:
            raise Unavailable("feature store unreachable")
        by_part: dict[int, list[int]] = {}
        for p, j in rows:
            by_part.setdefault(p, []).append(j)
        now = time.time()
        for p, at in by_part.items():
            stale = read.parts[p].fall_back(at, now)
            self.metrics.fallback_rows.labels("stale").inc(stale)
            self.metrics.fallback_rows.labels("default").inc(len(at) - stale)

    def _rows(self, part: _Part, now: float) -> ViewRows:
        view, records, present = part.view, part.records, part.present
        if part.bad_layout:
            raise FailedPrecondition(
                f"records of view {view.name!r} under {part.prefix!r} do not match its declared layout "
                f"({view.record_dtype.itemsize} bytes each); re-ingest the view or fix the registry"
            )
        default = np.frombuffer(view.default_record, dtype=view.record_dtype)[0]
        if not present.all():
            records[~present] = default
        if view.timestamped:
            age = now - records[TIMESTAMP_FIELD]
            if view.ttl_seconds:
                # Values past the view's TTL are never served, whatever Redis still holds.
                expired = present & (age > view.ttl_seconds)
                if expired.any():
                    records[expired] = default
                    present = present & ~expired
        else:
            age = np.full(len(records), now - self.versions.materialized_at.get(part.prefix, math.nan))
        age = np.where(present, age, np.inf).astype(np.float32)
        return ViewRows(view=view, records=records, present=present, age_seconds=age, fell_back=part.fell_back)


def _pack(view: FeatureView, values: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Redis values as records (the view's default where absent): (records, present, ok), ok
    False for a value of another size than the view's record (its row is left unset)."""
    n, dtype = len(values), view.record_dtype
    present = np.fromiter(map(operator.is_not, values, repeat(None)), dtype=bool, count=n)
    sizes = np.fromiter(map(len, _values_at(values, present)), dtype=np.intp, count=int(present.sum()))
    ok = ~present
    ok[present] = sizes == dtype.itemsize
    good = present & ok
    if good.all():
        # Every value present: all bytes.
        return np.frombuffer(b"".join(cast("list[bytes]", values)), dtype=dtype), present, ok
    records = np.empty(n, dtype=dtype)
    records[~present] = np.frombuffer(view.default_record, dtype=dtype)[0]
    np.put(records, np.flatnonzero(good), np.frombuffer(b"".join(_values_at(values, good)), dtype=dtype))
    return records, present, ok


def _values_at(values: list[bytes | None], mask: np.ndarray) -> Iterator[bytes]:
    """The values where `mask` is set: bytes, as `mask` is never set at a None (a `present` mask)."""
    return cast("Iterator[bytes]", compress(values, mask))


def _vectors(rows: ViewRows, feature: str) -> np.ndarray:
    """The feature of every row as a [rows, width] matrix (reshape(n, -1) fails on 0 rows)."""
    values = rows.records[feature]
    return values.reshape(len(values), math.prod(values.shape[1:]))  # (math: np.prod costs 5 us)


@dataclass(frozen=True)
class _Parts:
    """A batch's read, by view: the user views' rows (row r: request r's user) and the item
    views' rows (every request's items laid end to end)."""

    users: dict[str, ViewRows]
    items: dict[str, ViewRows]


def _assemble(
    reference: ReferenceSpec, layout: RequestLayout, parts: _Parts, u: int, user_id: str, at: slice
) -> FeatureRows | NotFound:
    """One request's tensors out of a shared read: its user is row `u` of the user views,
    its items the slice `at` of the item views (numpy views, no item loop)."""
    users, items = parts.users[reference.user_view], parts.items[reference.item_view]
    if not users.present[u] and not users.fell_back[u]:
        return NotFound(f"unknown user {echo(user_id)}")
    n = at.stop - at.start
    vectors = layout.vectors
    rows = _fill(vectors, parts, u, at, n) if vectors is not None else np.empty((n, 0), dtype="<f4")
    present = items.present[at]
    degraded = any(p.fell_back[u] for p in parts.users.values()) or any(
        p.fell_back[at].any() for p in parts.items.values()
    )
    return FeatureRows(
        model_input=rows.tobytes(),
        rows=n,
        item_categories=items.records[reference.category_feature][at].astype("<i4", copy=False).tobytes(),
        item_present=present.astype(np.uint8).tobytes(),
        missing_items=n - int(present.sum()),
        columns=rows.shape[1],
        degraded=bool(degraded),
        user_columns=layout.user_columns,
        model_input_name=vectors.name if vectors is not None else "",
        inputs=tuple(
            RowsTensor(t.name, t.datatype, _fill(t, parts, u, at, n).tobytes(), t.width) for t in layout.inputs
        ),
    )


def _fill(tensor: InputLayout, parts: _Parts, u: int, at: slice, n: int) -> np.ndarray:
    """The tensor's rows: per column, the user's value broadcast or the items' values."""
    out = np.empty((n, tensor.width), dtype=tensor.dtype)
    for column in tensor.columns:
        if column.of_user:
            out[:, column.start : column.stop] = parts.users[column.view].records[column.feature][u].reshape(-1)
        else:
            out[:, column.start : column.stop] = _vectors(parts.items[column.view], column.feature)[at]
    return out
