"""The local cache tier (TTL + LRU bounded in bytes) and the Redis circuit breaker."""

from __future__ import annotations

import math

import pytest

from services.runtime.breaker import CircuitBreaker
from services.features.cache import ENTRY_OVERHEAD_BYTES, LocalCache


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(max_bytes: int = 10_000, ttl: float = 5.0) -> tuple[LocalCache, Clock, Clock]:
    mono, wall = Clock(), Clock(1_800_000_000.0)
    return LocalCache(max_bytes, ttl, monotonic=mono, wall=wall), mono, wall


def test_fresh_then_stale_but_still_available() -> None:
    cache, mono, _ = make(ttl=5.0)
    cache.put("k", b"v")
    entry = cache.get("k")
    assert entry is not None and entry.value == b"v" and cache.is_fresh(entry)
    mono.now += 6
    entry = cache.get("k")
    assert entry is not None and not cache.is_fresh(entry)  # kept for degraded answers


def test_hard_expiry_is_never_served() -> None:
    cache, _, wall = make()
    cache.put("k", b"v", expires_at=wall.now + 1)
    assert cache.get("k") is not None
    wall.now += 1
    assert cache.get("k") is None and len(cache) == 0 and cache.bytes == 0
    assert cache.get_many(["k"]) == [None]


def test_absent_values_are_cached() -> None:
    cache, _, _ = make()
    cache.put("missing", None)
    entry = cache.get("missing")
    assert entry is not None and entry.value is None


def test_lru_eviction_keeps_the_byte_bound() -> None:
    size = len("k0") + 100 + ENTRY_OVERHEAD_BYTES
    cache, _, _ = make(max_bytes=3 * size)
    for i in range(3):
        cache.put(f"k{i}", bytes(100))
    assert cache.bytes == 3 * size
    cache.get("k0")  # k0 becomes most recently used: k1 is the eviction victim
    cache.put("k3", bytes(100))
    assert cache.bytes <= 3 * size and cache.evictions == 1
    assert [cache.get(k) is not None for k in ("k0", "k1", "k2", "k3")] == [True, False, True, True]


def test_replacing_an_entry_accounts_bytes_once() -> None:
    cache, _, _ = make()
    cache.put("k", bytes(10))
    cache.put("k", bytes(30))
    assert cache.bytes == len("k") + 30 + ENTRY_OVERHEAD_BYTES and len(cache) == 1


def test_disabled_cache_stores_nothing() -> None:
    cache, _, _ = make(max_bytes=0)
    cache.put("k", b"v")
    assert not cache.enabled and cache.get("k") is None


def test_get_many_preserves_order_and_misses() -> None:
    cache, _, _ = make()
    cache.put("a", b"1")
    cache.put("c", b"3", expires_at=math.inf)
    assert [e.value if e else None for e in cache.get_many(["a", "b", "c"])] == [b"1", None, b"3"]


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
