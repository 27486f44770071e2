"""Feature retrieval: any views for any entities from Redis in one round trip, behind a local cache.

Transport-agnostic: the gRPC servicer converts at the edge; this module knows Redis and
numpy only.

A read goes: local cache (fresh hits answer at once) -> coalescing (a key another request
is already reading is awaited, not read again) -> one MGET of the remaining keys plus the
views' pointer keys. If Redis is slow or down (or the circuit breaker is open), stale cache
entries and then the views' defaults answer instead and the result is flagged degraded.
A batch of reference-form requests (get_many) is one such read: its users and the union of
its item ids, each key once; each request is then cut out of it and flagged on its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import Counter

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
from services.features.cache import Entry, LocalCache
from services.features.layout import entity_key_prefix, meta_key, pointer_key
from services.features.registry import TIMESTAMP_FIELD, FeatureView, ReferenceSpec, Registry, load_registry

# Results a key's in-flight future can carry besides the value itself.
_RETRY = object()  # the reader saw the view re-materialized (or was cancelled): read again
_FAILED = object()  # the reader could not reach Redis: fall back
# A read re-starts at most this many times when views switch materialization under it.
_MAX_ATTEMPTS = 3
# Background reads (pointer refresh, probes) never wait longer than this.
_BACKGROUND_TIMEOUT = 1.0
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)
_TIMESTAMP = struct.Struct("<d")


class _RedisDown(Exception):
    pass


class _Restart(Exception):
    pass


# (part, row, key, the key's in-flight Redis read): one row a read still has to fill.
_Claim = tuple[int, int, str, asyncio.Future[Any]]


@dataclass(eq=False)
class _Read:
    """One attempt at a read: what each part's rows hold so far, and the keys left to read."""

    parts: Sequence[tuple[FeatureView, Sequence[str]]]
    prefixes: list[str]  # the materialization each part's keys were built for
    values: list[list[Any]] = field(init=False)  # per part, per row: the record's bytes or None
    fell_back: list[np.ndarray] = field(init=False)  # per part, bool per row: served without Redis
    owned: list[_Claim] = field(default_factory=list)  # this read fetches them, for every waiter
    waiting: list[_Claim] = field(default_factory=list)  # another request is fetching them
    stale: dict[str, Entry] = field(default_factory=dict)  # expired cache entries, to fall back on

    def __post_init__(self) -> None:
        self.values = [[None] * len(ids) for _, ids in self.parts]
        self.fell_back = [np.zeros(len(ids), dtype=bool) for _, ids in self.parts]


@dataclass(frozen=True)
class FeatureRows:
    """Model-ready rows for one request, all as little-endian bytes in request order."""

    model_input: bytes  # rows x (user width + item width) float32
    rows: int
    item_categories: bytes  # int32 per row
    item_present: bytes  # uint8 per row
    missing_items: int
    columns: int = 0
    degraded: bool = False
    # The leading columns of each row that hold the user's features; the rest are the item's.
    user_columns: int = 0


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
    ) -> None:
        self._redis = client
        self.namespace = namespace
        self._max_items = max_items
        self._max_id_length = max_id_length
        self.registry = registry if registry is not None else load_registry()
        self.cache = cache if cache is not None else LocalCache(0, 0.0)  # (an empty cache is falsy)
        self.breaker = breaker
        self.metrics = metrics if metrics is not None else StoreMetrics.create(Metrics("features"))
        self.versions = Versions(namespace, list(self.registry.views))
        self._redis_timeout = redis_timeout
        self._inflight: dict[str, asyncio.Future[Any]] = {}
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
        get() would answer it alone, in request order. One read for all: every user once and
        the union of the item ids, each id once, so at most one Redis round trip."""
        outcomes: list[FeatureRows | Exception | None] = [self._reference_error(u, ids) for u, ids in requests]
        valid = [i for i, outcome in enumerate(outcomes) if outcome is None]
        if valid:
            batch = [requests[i] for i in valid]
            try:
                built = await self._reference_rows(batch, timeout)
            except FailedPrecondition as error:
                # A record of the wrong layout fails only the requests that read it, as it would
                # alone: each request read on its own (an error path, never a hot one).
                built = [error] if len(batch) == 1 else [(await self.get_many([r], timeout))[0] for r in batch]
            except InfermeshError as error:  # the store unreachable or re-materializing: for all
                built = [error] * len(batch)
            for i, outcome in zip(valid, built):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]  (every None was replaced)

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
        return None

    async def _reference_rows(
        self, requests: Sequence[tuple[str, Sequence[str]]], timeout: float | None
    ) -> list[FeatureRows | Exception]:
        """One read of the requests' users and item union, then each request's rows by index."""
        reference = self.registry.reference
        assert reference is not None  # _reference_error checked it
        users = _positions_of(user for user, _ in requests)
        items = _positions_of(chain.from_iterable(ids for _, ids in requests))
        views = self.registry.views
        user_rows, item_rows = await self._read(
            [(views[reference.user_view], list(users)), (views[reference.item_view], list(items))], timeout
        )
        built: list[FeatureRows | Exception] = []
        for user_id, item_ids in requests:
            at = np.fromiter(map(items.__getitem__, item_ids), dtype=np.intp, count=len(item_ids))
            try:
                built.append(_assemble(reference, user_rows, users[user_id], user_id, item_rows, at))
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
        for name, value in zip(names, raw):
            if self.versions.set(name, self.versions.decode(value)):
                self.metrics.switches.inc()
        unknown = sorted(set(self.versions.current().values()) - set(self.versions.materialized_at))
        if unknown:
            for prefix, doc in zip(unknown, await self._mget([meta_key(p) for p in unknown], deadline)):
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
        return reply

    def _expiry(self, view: FeatureView, value: bytes | None) -> float:
        """Wall-clock time past which the cached value must not be served (the view's TTL)."""
        if value is None or not view.ttl_seconds:
            return math.inf
        written_at = _TIMESTAMP.unpack_from(value, view.record_dtype.fields[TIMESTAMP_FIELD][1])[0]
        return written_at + view.ttl_seconds

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
        return [
            self._rows(view, prefix, read.values[p], read.fell_back[p], wall)
            for p, ((view, _), prefix) in enumerate(zip(parts, read.prefixes))
        ]

    def _claim_keys(self, parts: Sequence[tuple[FeatureView, Sequence[str]]]) -> _Read:
        """Fresh local cache entries answer at once; every other key is claimed for this read
        to fetch (owned), or awaited from the request already fetching it (waiting)."""
        cache, inflight = self.cache, self._inflight
        loop = asyncio.get_running_loop()
        read = _Read(parts, [self.versions.prefix(view.name) for view, _ in parts])
        now = time.monotonic()
        lookup_started = time.perf_counter_ns()
        lookups = 0
        for p, ((view, ids), prefix) in enumerate(zip(parts, read.prefixes)):
            head = entity_key_prefix(prefix, view.key)
            keys = [head + entity for entity in ids]
            entries = cache.get_many(keys) if cache.enabled else [None] * len(keys)
            row = read.values[p]
            lookups += len(keys)
            for j, (key, entry) in enumerate(zip(keys, entries)):
                if entry is not None:
                    if entry.fresh_until > now:
                        row[j] = entry.value
                        continue
                    read.stale[key] = entry
                future = inflight.get(key)
                if future is None:
                    future = inflight[key] = loop.create_future()
                    read.owned.append((p, j, key, future))
                else:
                    read.waiting.append((p, j, key, future))
        self._count_lookups(read, lookups, lookup_started)
        return read

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
        if read.waiting:
            self.metrics.coalesced.inc(len(read.waiting))

    async def _fetch_owned(self, read: _Read, deadline: float) -> None:
        """The one Redis round trip: the views' pointers and this read's own keys; whatever
        happens, every request waiting on those keys is answered."""
        pointers = [self.versions.pointer(view.name) for view, _ in read.parts]
        try:
            reply = await self._mget(pointers + [key for _, _, key, _ in read.owned], deadline)
        except _RedisDown as error:
            for *_, future in read.owned:
                future.set_result(_FAILED)
            if self.breaker is None:
                raise Unavailable(f"feature store unreachable: {error}") from None
            for p, j, key, _ in read.owned:
                self._fall_back(read, p, j, key)
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
        for (view, _), prefix, raw in zip(read.parts, read.prefixes, pointers):
            serving = self.versions.decode(raw)
            if serving != prefix:
                moved = True
                if self.versions.set(view.name, serving):
                    self.metrics.switches.inc()
        if moved:
            for *_, future in read.owned:
                future.set_result(_RETRY)
            raise _Restart

    def _keep_fetched(self, read: _Read, fetched: list[bytes | None]) -> None:
        """The fetched values: into the read's rows, to the waiters, into the local cache."""
        found = 0
        for (p, j, key, future), value in zip(read.owned, fetched):
            read.values[p][j] = value
            future.set_result(value)
            if value is not None:
                found += 1
                self.cache.put(key, value, self._expiry(read.parts[p][0], value))
            else:
                self.cache.put(key, None)
        self.metrics.lookups.labels("redis", "hit").inc(found)
        self.metrics.lookups.labels("redis", "miss").inc(len(read.owned) - found)

    async def _await_others(self, read: _Read, deadline: float) -> None:
        """The keys other requests were reading: their values, or a fall-back where that read
        failed or outlasts this read's deadline; _Restart where it saw a view switch."""
        pending = {future for *_, future in read.waiting if not future.done()}
        remaining = deadline - time.monotonic()
        if pending and remaining > 0:
            await asyncio.wait(pending, timeout=remaining)
        for p, j, key, future in read.waiting:
            result = future.result() if future.done() else _FAILED
            if result is _RETRY:
                raise _Restart
            if result is _FAILED:
                self._fall_back(read, p, j, key)
            else:
                read.values[p][j] = result

    def _fall_back(self, read: _Read, p: int, j: int, key: str) -> None:
        """A row Redis did not answer: a stale cache entry within the view's TTL, else the
        view's default (None here); the part is degraded. Without a breaker: Unavailable."""
        if self.breaker is None:
            raise Unavailable("feature store unreachable")
        read.fell_back[p][j] = True
        entry = read.stale.get(key)
        if entry is not None and entry.expires_at > time.time():
            read.values[p][j] = entry.value
            self.metrics.fallback_rows.labels("stale").inc()
        else:
            read.values[p][j] = None
            self.metrics.fallback_rows.labels("default").inc()

    def _rows(self, view: FeatureView, prefix: str, values: list[Any], fell_back: np.ndarray, now: float) -> ViewRows:
        n = len(values)
        present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
        packed = (
            b"".join(values) if present.all() else b"".join(v if v is not None else view.default_record for v in values)
        )
        if len(packed) != n * view.record_dtype.itemsize:
            raise FailedPrecondition(
                f"records of view {view.name!r} under {prefix!r} do not match its declared layout "
                f"({view.record_dtype.itemsize} bytes each); re-ingest the view or fix the registry"
            )
        records = np.frombuffer(packed, dtype=view.record_dtype)
        if view.timestamped:
            age = now - records[TIMESTAMP_FIELD]
            if view.ttl_seconds:
                # Values past the view's TTL are never served, whatever Redis still holds.
                expired = present & (age > view.ttl_seconds)
                if expired.any():
                    records = records.copy()
                    records[expired] = np.frombuffer(view.default_record, dtype=view.record_dtype)[0]
                    present = present & ~expired
        else:
            age = np.full(n, now - self.versions.materialized_at.get(prefix, math.nan))
        age = np.where(present, age, np.inf).astype(np.float32)
        return ViewRows(view=view, records=records, present=present, age_seconds=age, fell_back=fell_back)


def _positions_of(ids: Iterable[str]) -> dict[str, int]:
    """Each distinct id (first occurrence first) -> its row in the read; built in C."""
    distinct = dict.fromkeys(ids)
    return dict(zip(distinct, range(len(distinct))))


def _vectors(rows: ViewRows, feature: str) -> np.ndarray:
    """The feature of every row as a [rows, width] matrix (reshape(n, -1) fails on 0 rows)."""
    values = rows.records[feature]
    return values.reshape(len(values), int(np.prod(values.shape[1:])))


def _assemble(
    reference: ReferenceSpec, users: ViewRows, u: int, user_id: str, items: ViewRows, at: np.ndarray
) -> FeatureRows | NotFound:
    """One request's model rows [user vector, item vector] out of a shared read: its user is
    row `u` of `users`, its items rows `at` of `items` (numpy fancy indexing, no item loop)."""
    if not users.present[u] and not users.fell_back[u]:
        return NotFound(f"unknown user {echo(user_id)}")
    user_vec = users.records[reference.vector_feature][u].reshape(-1)
    item_vecs = _vectors(items, reference.vector_feature)[at]
    n = len(at)
    rows = np.empty((n, user_vec.size + item_vecs.shape[1]), dtype="<f4")
    rows[:, : user_vec.size] = user_vec
    rows[:, user_vec.size :] = item_vecs
    present = items.present[at]
    return FeatureRows(
        model_input=rows.tobytes(),
        rows=n,
        item_categories=items.records[reference.category_feature][at].astype("<i4", copy=False).tobytes(),
        item_present=present.astype(np.uint8).tobytes(),
        missing_items=n - int(present.sum()),
        columns=rows.shape[1],
        degraded=bool(users.fell_back[u] or items.fell_back[at].any()),
        user_columns=user_vec.size,
    )
