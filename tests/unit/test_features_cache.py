"""The local cache tier (per-key-space tables, TTL, CLOCK eviction bounded in bytes) and the
Redis circuit breaker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.features.cache import ENTRY_OVERHEAD_BYTES, LocalCache, Lookup
from services.runtime.breaker import CircuitBreaker

RECORD = np.dtype([("x", "<f4"), ("n", "<i4")])
ENTRY = RECORD.itemsize + ENTRY_OVERHEAD_BYTES  # plus the id's length
HEAD = "t:v:"
INF = math.inf


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(max_bytes: int = 100_000, ttl: float = 5.0) -> tuple[LocalCache, Clock, Clock]:
    mono, wall = Clock(), Clock(1_800_000_000.0)
    return LocalCache(max_bytes, ttl, monotonic=mono, wall=wall), mono, wall


def records(*values: float) -> np.ndarray:
    out = np.zeros(len(values), RECORD)
    out["x"], out["n"] = values, np.arange(len(values))
    return out


def put(cache: LocalCache, ids: list[str], values: list[float | None], expires_at: list[float] | None = None) -> None:
    """Entries of HEAD: a value per id, None for an absent entity."""
    present = np.array([v is not None for v in values])
    cache.put_many(
        HEAD,
        ids,
        records(*(v if v is not None else 0.0 for v in values)),
        present,
        np.array(expires_at if expires_at is not None else [INF] * len(ids)),
    )


def look(cache: LocalCache, *ids: str) -> Lookup:
    return cache.lookup(HEAD, RECORD, list(ids))


def test_fresh_then_stale_but_still_available() -> None:
    cache, mono, _ = make(ttl=5.0)
    put(cache, ["k"], [1.5])
    hit = look(cache, "k")
    assert hit.live.tolist() == hit.fresh.tolist() == hit.present.tolist() == [True]
    assert hit.records["x"].tolist() == [1.5]
    mono.now += 6
    hit = look(cache, "k")
    assert hit.live.tolist() == [True] and hit.fresh.tolist() == [False]  # kept for degraded answers
    assert hit.present.tolist() == [True] and hit.records["x"].tolist() == [1.5]
    put(cache, ["k"], [2.5])  # re-read from Redis: fresh again, the new value
    hit = look(cache, "k")
    assert hit.fresh.tolist() == [True] and hit.records["x"].tolist() == [2.5] and len(cache) == 1


def test_hard_expiry_is_never_served_and_frees_the_entry() -> None:
    cache, _, wall = make()
    put(cache, ["k", "forever"], [1.0, 2.0], expires_at=[wall.now + 1, INF])
    assert look(cache, "k").live.tolist() == [True]
    assert look(cache, "k").expires_at.tolist() == [wall.now + 1]
    wall.now += 1
    assert look(cache, "k", "k").live.tolist() == [False, False]  # twice in one lookup: dropped once
    assert len(cache) == 1 and cache.bytes == len("forever") + ENTRY
    assert look(cache, "forever").live.tolist() == [True]


def test_absent_entities_are_cached_as_not_present() -> None:
    cache, _, _ = make()
    put(cache, ["missing"], [None])
    hit = look(cache, "missing")
    assert hit.live.tolist() == hit.fresh.tolist() == [True] and hit.present.tolist() == [False]


def test_a_lookup_of_many_ids_mixes_hits_misses_stale_expired_and_absent_in_order() -> None:
    cache, mono, wall = make(ttl=10.0)
    put(cache, ["old", "gone"], [1.0, 2.0], expires_at=[INF, wall.now + 5])
    mono.now += 11  # "old" and "gone" are stale now
    wall.now += 5  # and "gone" is past its TTL
    put(cache, ["new", "none"], [3.0, None])
    hit = look(cache, "new", "unknown", "old", "gone", "none", "new")
    assert hit.live.tolist() == [True, False, True, False, True, True]
    assert hit.fresh.tolist() == [True, False, False, False, True, True]
    assert hit.present.tolist() == [True, False, True, False, False, True]
    assert hit.records["x"][hit.present].tolist() == [3.0, 1.0, 3.0]
    assert len(cache) == 3  # "gone" was dropped by the lookup
    assert look(cache).records.shape == (0,)


def test_lookups_are_copies() -> None:
    cache, _, _ = make()
    put(cache, ["k"], [1.0])
    hit = look(cache, "k")
    put(cache, ["k"], [9.0])
    cache.drop(HEAD)
    assert hit.records["x"].tolist() == [1.0]


def test_eviction_keeps_the_byte_bound_and_gives_used_entries_a_second_chance() -> None:
    size = len("k0") + ENTRY
    cache, _, _ = make(max_bytes=3 * size)
    put(cache, ["k0", "k1", "k2"], [0.0, 1.0, 2.0])
    assert cache.bytes == 3 * size
    put(cache, ["k3"], [3.0])  # every entry was just used: the hand clears them all, then takes k0
    assert cache.bytes == 3 * size and cache.evictions == 1 and len(cache) == 3
    assert not look(cache, "k0").live.any()
    look(cache, "k1")  # used since the hand passed: k2 is the next victim
    put(cache, ["k4"], [4.0])
    assert look(cache, "k0", "k1", "k2", "k3", "k4").live.tolist() == [False, True, False, True, True]
    assert cache.evictions == 2 and cache.bytes == 3 * size


def test_eviction_spans_key_spaces_and_an_emptied_one_goes() -> None:
    size = len("k0") + ENTRY
    cache, _, _ = make(max_bytes=4 * size)
    put(cache, ["k0", "k1"], [0.0, 1.0])
    cache.put_many("t:w:", ["k0", "k1", "k2", "k3"], records(0, 1, 2, 3), np.ones(4, bool), np.full(4, INF))
    assert cache.bytes <= 4 * size and len(cache) == 4
    assert not look(cache, "k0", "k1").live.any()  # the older key space was evicted first...
    assert HEAD not in cache._tables  # ...and, left empty, released its arrays


def test_random_puts_and_lookups_keep_the_bound_the_accounting_and_the_values() -> None:
    rng = np.random.default_rng(7)
    cache, mono, _ = make(max_bytes=300 * ENTRY)
    latest: dict[str, float] = {}
    for _step in range(300):
        ids = [f"e{i}" for i in rng.choice(2_000, int(rng.integers(1, 120)), replace=False)]
        values = rng.random(len(ids)).astype(np.float32).tolist()
        put(cache, ids, values)
        latest.update(zip(ids, values, strict=False))
        asked = [f"e{i}" for i in rng.integers(0, 2_000, 200)]
        hit = look(cache, *asked)
        assert cache.bytes <= cache.max_bytes
        assert cache.bytes == sum(int(t.size.sum()) for t in cache._tables.values())
        assert len(cache) == sum(int((t.size > 0).sum()) for t in cache._tables.values())
        assert hit.records["x"][hit.live].tolist() == [
            latest[k] for k, live in zip(asked, hit.live, strict=False) if live
        ]
        mono.now += 0.01
    assert cache.evictions > 0


def test_replacing_an_entry_accounts_bytes_once() -> None:
    cache, _, _ = make()
    put(cache, ["k"], [1.0])
    put(cache, ["k"], [None])
    put(cache, ["k", "k"], [2.0, 3.0])  # the last value of a repeated id wins
    assert cache.bytes == len("k") + ENTRY and len(cache) == 1
    assert look(cache, "k").records["x"].tolist() == [3.0]


def test_an_entry_larger_than_the_bound_is_not_cached() -> None:
    cache, _, _ = make(max_bytes=ENTRY)
    put(cache, ["long-id"], [1.0])
    assert len(cache) == 0 and cache.bytes == 0


def test_a_key_space_read_with_another_layout_misses() -> None:
    cache, _, _ = make()
    put(cache, ["k"], [1.0])
    assert not cache.lookup(HEAD, np.dtype([("y", "<f8")]), ["k"]).live.any()
    assert not cache.lookup("t:other:", RECORD, ["k"]).live.any()


def test_drop_and_clear_free_everything() -> None:
    cache, _, _ = make()
    put(cache, ["a", "b"], [1.0, 2.0])
    cache.drop(HEAD)
    assert cache.bytes == 0 and len(cache) == 0
    put(cache, ["a"], [1.0])
    cache.clear()
    assert cache.bytes == 0 and not look(cache, "a").live.any()


def test_disabled_cache_stores_nothing() -> None:
    cache, _, _ = make(max_bytes=0)
    put(cache, ["k"], [1.0])
    assert not cache.enabled and not look(cache, "k").live.any() and cache.bytes == 0


def test_breaker_opens_after_consecutive_failures_and_probes_on_schedule() -> None:
    clock = Clock(0.0)
    changes: list[bool] = []
    breaker = CircuitBreaker(3, probe_interval=0.5, clock=clock, on_change=changes.append)
    breaker.record_failure()
    breaker.record_success()  # a success resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert not breaker.allow() and breaker.is_open and changes == [True]
    assert not breaker.probe_due()
    clock.now += 0.5
    assert breaker.probe_due() and not breaker.probe_due()  # one probe per interval
    breaker.record_success()
    assert breaker.allow() and changes == [True, False]


def test_breaker_rejects_a_zero_threshold() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0)
