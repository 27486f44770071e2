"""FeatureStore logic against an in-memory Redis stand-in: coalescing, fallback, versions.

The real-Redis behaviour (round trips, TTL, atomic switch) is in
tests/integration/test_features_store.py.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis.exceptions
import yaml

from services.features.cache import LocalCache
from services.features.layout import ITEM_RECORD, USER_RECORD, item_key, pointer_key, user_key
from services.features.registry import parse_registry
from services.features.store import FeatureRows, FeatureStore
from services.runtime.breaker import CircuitBreaker
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

NS = "t"


class FakeRedis:
    """MGET over a dict; can be made to fail or to stall, and counts calls."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls = 0
        self.keys_read: list[list[str]] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        self.keys_read.append(list(keys))
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise redis.exceptions.ConnectionError("connection refused")
        return [self.data.get(k) for k in keys]


def user_bytes(value: float) -> bytes:
    record = np.zeros(1, dtype=USER_RECORD)
    record["vec"] = value
    return record.tobytes()


def item_bytes(value: float, category: int) -> bytes:
    record = np.zeros(1, dtype=ITEM_RECORD)
    record["vec"], record["category"], record["price"] = value, category, 9.5
    return record.tobytes()


@pytest.fixture
def fake() -> FakeRedis:
    r = FakeRedis()
    r.data[user_key(NS, "u1")] = user_bytes(1.0)
    for i in range(5):
        r.data[item_key(NS, f"i{i}")] = item_bytes(float(i), i)
    return r


def store(fake: FakeRedis, *, cache_ttl: float = 30.0, breaker: bool = True, max_items: int = 1000) -> FeatureStore:
    return FeatureStore(
        fake,  # type: ignore[arg-type]
        NS,
        max_items,
        cache=LocalCache(1 << 20, cache_ttl),
        breaker=CircuitBreaker(2, probe_interval=10.0) if breaker else None,
        redis_timeout=0.2,
    )


async def test_reference_rows_in_request_order(fake: FakeRedis) -> None:
    rows = await store(fake).get("u1", ["i3", "nope", "i1"])
    matrix = np.frombuffer(rows.model_input, dtype="<f4").reshape(3, 64)
    assert rows.columns == 64 and rows.missing_items == 1 and not rows.degraded
    assert (matrix[:, :32] == 1.0).all()
    assert (matrix[0, 32:] == 3.0).all() and (matrix[1, 32:] == 0).all() and (matrix[2, 32:] == 1.0).all()
    assert np.frombuffer(rows.item_categories, "<i4").tolist() == [3, 0, 1]
    assert np.frombuffer(rows.item_present, np.uint8).tolist() == [1, 0, 1]


async def test_an_empty_item_id_is_invalid_not_unknown(fake: FakeRedis) -> None:
    with pytest.raises(InvalidArgument, match=r"item_ids\[1\] is empty"):
        await store(fake).get("u1", ["i3", ""])
    assert fake.calls == 0


async def test_hot_entities_come_from_the_local_cache(fake: FakeRedis) -> None:
    s = store(fake)
    await s.get("u1", ["i1", "i2"])
    await s.get("u1", ["i1", "i2"])
    assert fake.calls == 1
    assert s.metrics.lookups.labels("local", "hit")._value.get() == 3


async def test_concurrent_requests_for_the_same_entities_share_one_read(fake: FakeRedis) -> None:
    s = store(fake)
    fake.gate = asyncio.Event()
    calls = [asyncio.create_task(s.get("u1", ["i1", "i2", "i3"])) for _ in range(10)]
    await asyncio.sleep(0.01)
    fake.gate.set()
    results = await asyncio.gather(*calls)
    assert fake.calls == 1
    assert len({r.model_input for r in results}) == 1
    assert s.metrics.coalesced._value.get() == 9 * 4


async def test_redis_down_serves_stale_entries_then_defaults_flagged_degraded(fake: FakeRedis) -> None:
    s = store(fake, cache_ttl=0.0)  # every entry is stale at once: each read goes to Redis
    await s.get("u1", ["i1"])
    fake.down = True
    rows = await s.get("u1", ["i1", "i2"])
    matrix = np.frombuffer(rows.model_input, "<f4").reshape(2, 64)
    assert rows.degraded
    assert (matrix[0, 32:] == 1.0).all()  # i1 from the stale cache entry
    assert np.frombuffer(rows.item_present, np.uint8).tolist() == [1, 0]  # i2: default, not present
    assert s.metrics.degraded._value.get() == 1
    assert s.metrics.fallback_rows.labels("stale")._value.get() == 2  # u1 and i1


async def test_unknown_user_while_degraded_gets_defaults_not_an_error(fake: FakeRedis) -> None:
    s = store(fake)
    fake.down = True
    rows = await s.get("u404", ["i1"])
    assert rows.degraded and rows.missing_items == 1
    fake.down = False
    with pytest.raises(NotFound, match="unknown user"):
        await store(fake).get("u404", ["i1"])


async def test_open_breaker_skips_redis_entirely(fake: FakeRedis) -> None:
    s = store(fake, cache_ttl=0.0)
    fake.down = True
    await s.get("u1", ["i1"])
    await s.get("u1", ["i1"])  # second consecutive failure opens the breaker (threshold 2)
    assert s.breaker is not None and s.breaker.is_open
    calls = fake.calls
    rows = await s.get("u1", ["i1"])
    assert rows.degraded and fake.calls == calls


async def test_slow_redis_answers_within_the_budget(fake: FakeRedis) -> None:
    s = store(fake)
    fake.gate = asyncio.Event()  # never set: Redis hangs
    loop = asyncio.get_running_loop()
    started = loop.time()
    rows = await s.get("u1", ["i1"], timeout=0.1)  # the store may use half of it
    assert rows.degraded and loop.time() - started < 1.0


async def test_without_a_breaker_failures_raise_unavailable(fake: FakeRedis) -> None:
    fake.down = True
    with pytest.raises(Unavailable):
        await store(fake, breaker=False).get("u1", ["i1"])


async def test_a_switched_pointer_makes_the_read_start_again_on_the_new_materialization(fake: FakeRedis) -> None:
    s = store(fake)
    new = f"{NS}:mat:item:7"
    fake.data[pointer_key(NS, "item")] = new.encode()
    fake.data[f"{new}:i:i1"] = item_bytes(42.0, 4)
    rows = await s.get("u1", ["i1"])
    matrix = np.frombuffer(rows.model_input, "<f4").reshape(1, 64)
    assert (matrix[0, 32:] == 42.0).all() and fake.calls == 2
    assert s.versions.prefix("item") == new and s.metrics.switches._value.get() == 1


async def alone(fake: FakeRedis, user_id: str, item_ids: list[str], **kwargs: float) -> FeatureRows | Exception:
    """What get() answers for the request on a store of its own (no cache shared with others)."""
    try:
        return await store(fake, **kwargs).get(user_id, item_ids)  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001
        return error


def same(batched: FeatureRows | Exception, single: FeatureRows | Exception) -> bool:
    if isinstance(single, Exception):
        return type(batched) is type(single) and str(batched) == str(single)
    return batched == single  # a frozen dataclass of bytes and ints: byte for byte


async def test_a_batch_reads_each_key_once_and_answers_each_request_as_alone(fake: FakeRedis) -> None:
    fake.data[user_key(NS, "u2")] = user_bytes(2.0)
    requests = [
        ("u1", ["i1", "i2", "i3"]),
        ("u2", ["i3", "i2", "i1"]),  # the same items, another user and order
        ("u1", ["i4", "i4", "nope"]),  # a duplicate within, an unknown item
        ("u2", ["i0"]),  # disjoint
        ("u1", []),
    ]
    s = store(fake)
    outcomes = await s.get_many(requests)
    assert fake.calls == 1 and s.metrics.coalesced._value.get() == 0  # repeats wait on this read's own
    (keys,) = fake.keys_read
    item_keys = [item_key(NS, i) for i in ("i1", "i2", "i3", "i4", "nope", "i0")]
    assert keys[2:] == [user_key(NS, "u1"), user_key(NS, "u2"), *item_keys]  # after the 2 pointers
    for request, outcome in zip(requests, outcomes, strict=False):
        assert same(outcome, await alone(fake, *request)), request
    assert outcomes[4].rows == 0 and outcomes[4].user_columns == 32  # type: ignore[union-attr]


async def test_a_bad_request_fails_alone_with_the_error_get_gives_it(fake: FakeRedis) -> None:
    requests = [
        ("u1", ["i1"]),
        ("u404", ["i1"]),
        ("", ["i1"]),
        ("u1", ["i1", ""]),
        ("u1", ["i1", "i2", "i3", "i4"]),
        ("u1", ["i2"]),
    ]
    outcomes = await store(fake, max_items=3).get_many(requests)
    kinds = [type(outcome) for outcome in outcomes]
    assert kinds == [FeatureRows, NotFound, InvalidArgument, InvalidArgument, InvalidArgument, FeatureRows]
    assert str(outcomes[3]) == "item_ids[1] is empty; every item needs an id"
    assert str(outcomes[4]) == "at most 3 item_ids per request, got 4"
    for request, outcome in zip(requests, outcomes, strict=False):
        assert same(outcome, await alone(fake, *request, max_items=3)), request
    assert fake.keys_read[0][2:] == [user_key(NS, "u1"), user_key(NS, "u404"), item_key(NS, "i1"), item_key(NS, "i2")]


async def test_degraded_is_per_request_while_redis_is_down(fake: FakeRedis) -> None:
    s = store(fake)
    await s.get("u1", ["i1"])  # fresh in the local cache
    fake.down = True
    warm, cold = await s.get_many([("u1", ["i1"]), ("u1", ["i2"])])
    assert isinstance(warm, FeatureRows) and isinstance(cold, FeatureRows)
    assert not warm.degraded and cold.degraded and cold.missing_items == 1
    assert s.metrics.degraded._value.get() == 1  # degraded responses, not reads


async def test_a_record_of_the_wrong_layout_fails_only_the_requests_that_read_it(fake: FakeRedis) -> None:
    fake.data[item_key(NS, "broken")] = b"short"
    ok, broken = await store(fake).get_many([("u1", ["i1"]), ("u1", ["i2", "broken"])])
    assert isinstance(ok, FeatureRows) and same(ok, await alone(fake, "u1", ["i1"]))
    assert isinstance(broken, FailedPrecondition) and same(broken, await alone(fake, "u1", ["i2", "broken"]))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_a_warm_read_sends_only_its_stale_and_missing_keys_to_redis(fake: FakeRedis) -> None:
    mono = Clock(100.0)
    cache = LocalCache(1 << 20, 10.0, monotonic=mono)
    s = FeatureStore(fake, NS, 1000, cache=cache, breaker=CircuitBreaker())  # type: ignore[arg-type]
    await s.get("u1", ["i1", "i2"])
    mono.now += 11  # u1, i1 and i2 are stale now
    await s.get("u1", ["i3"])  # u1 re-read: fresh again, with i3
    rows = await s.get("u1", ["i1", "i3", "i4", "nope"])
    assert fake.keys_read[-1][2:] == [item_key(NS, "i1"), item_key(NS, "i4"), item_key(NS, "nope")]
    matrix = np.frombuffer(rows.model_input, "<f4").reshape(4, 64)
    assert matrix[:, 32].tolist() == [1.0, 3.0, 4.0, 0.0] and (matrix[:, :32] == 1.0).all()
    assert np.frombuffer(rows.item_present, np.uint8).tolist() == [1, 1, 1, 0] and not rows.degraded
    assert s.metrics.lookups.labels("local", "hit")._value.get() == 2  # u1 and i3
    again = await s.get("u1", ["i1", "i3", "i4", "nope"])  # all fresh now, the absent id too
    assert again == rows and len(fake.keys_read) == 3


TTL_REGISTRY = parse_registry(
    yaml.safe_load("""
entities: {item: {id_column: item_id}}
views:
  short:
    entity: item
    key: s
    ttl_seconds: 60
    features: [{name: x, dtype: float32, default: -1}]
""")
)


async def test_stale_entries_stand_in_while_redis_is_down_but_never_past_their_ttl(fake: FakeRedis) -> None:
    view = TTL_REGISTRY.views["short"]
    for entity, x in (("a", 1.0), ("b", 2.0)):
        record = np.zeros(1, view.record_dtype)
        record["x"], record["_written_at"] = x, time.time() - 30  # 30 s of its 60 left
        fake.data[f"{NS}:s:{entity}"] = record.tobytes()
    wall = Clock(time.time())
    cache = LocalCache(1 << 20, 0.0, wall=wall)  # every entry stale at once: each read asks Redis
    s = FeatureStore(
        fake,  # type: ignore[arg-type]
        NS,
        1000,
        registry=TTL_REGISTRY,
        cache=cache,
        breaker=CircuitBreaker(5),
    )
    assert (await s.get_views(["short"], ["a", "b", "c"])).present == bytes([1, 1, 0])
    fake.down = True
    got = await s.get_views(["short"], ["a", "b", "c"])
    assert got.degraded and got.present == bytes([1, 1, 0])  # a and b stale, c cached as absent
    assert np.frombuffer(got.matrix, "<f4").tolist() == [1.0, 2.0, -1.0]
    assert s.metrics.fallback_rows.labels("stale")._value.get() == 3
    wall.now += 31  # past the view's TTL: the cache drops them rather than serve them
    got = await s.get_views(["short"], ["a", "b"])
    assert got.degraded and got.present == bytes([0, 0])
    assert np.frombuffer(got.matrix, "<f4").tolist() == [-1.0, -1.0] and len(cache) == 1
    assert s.metrics.fallback_rows.labels("default")._value.get() == 2


async def test_a_materialization_switch_drops_the_cached_entries_of_the_replaced_one(fake: FakeRedis) -> None:
    s = store(fake)
    await s.get("u1", ["i1", "i2"])
    assert len(s.cache) == 3
    new = f"{NS}:mat:item:7"
    fake.data[pointer_key(NS, "item")] = new.encode()
    await s.refresh()
    assert len(s.cache) == 1 and s.versions.prefix("item") == new  # only the user's entry is left
