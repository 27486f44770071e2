"""The seen filter against the tests' real redis-server (its own namespace), a Redis that
is not there, and one that never answers; and the breaker that spares requests timeouts."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis

from infermesh.up.supervisor import free_port
from services.ranking.chain import Candidates, CategoryCap, Chain, SeenFilter
from services.ranking.layout import seen_key
from services.ranking.seen import SeenStore, StageSkipped
from services.runtime.breaker import CircuitBreaker
from tests.conftest import RedisServer

N = 50


@pytest.fixture
def namespace(redis_namespace: str) -> str:
    return redis_namespace


def request(user_id: str = "", explain: bool = False, **kwargs) -> Candidates:
    rng = np.random.default_rng(9)
    return Candidates(
        item_ids=[f"i{i}" for i in range(N)],
        scores=rng.random(N).astype("f4"),
        categories=rng.integers(0, 5, N).astype("i4"),
        present=np.ones(N, bool),
        user_id=user_id,
        k=N,
        explain=explain,
        **kwargs,
    )


class Skips:
    def __init__(self) -> None:
        self.seen: list[tuple[str, StageSkipped]] = []

    def __call__(self, stage: str, skip: StageSkipped) -> None:
        self.seen.append((stage, skip))


@pytest.mark.parametrize("lookup", ["members", "ismember"])
async def test_seen_items_are_filtered(redis_server: RedisServer, namespace: str, lookup: str) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.sadd(seen_key(namespace, "u1"), "i3", "i7", "i20", "not-a-candidate")
    store = SeenStore.from_url(redis_server.url, namespace, timeout_seconds=1.0, lookup=lookup)
    try:
        unfiltered = await Chain([]).rank(request("u1"))
        got = await Chain([SeenFilter(store)]).rank(request("u1", explain=True))
        expected = [i for i in unfiltered.page.tolist() if i not in (3, 7, 20)]
        assert got.page.tolist() == expected and got.total == N - 3 and got.skipped == []
        for item in (3, 7, 20):
            (effect,) = [e for e in got.explanations[item] if e.stage == "seen_filter"]
            assert effect.effect == "removed" and effect.rank_after == -1 and effect.detail == "seen by user u1"
        kept = [e for e in got.explanations[4] if e.stage == "seen_filter"]
        assert kept[0].effect == "kept"
        # A user with no set, or no user at all, loses nothing.
        assert (await Chain([SeenFilter(store)]).rank(request("u2"))).page.tolist() == unfiltered.page.tolist()
        assert (await Chain([SeenFilter(store)]).rank(request(""))).page.tolist() == unfiltered.page.tolist()
    finally:
        await store.close()


async def test_a_bad_key_skips_the_filter_for_that_user_only(redis_server: RedisServer, namespace: str) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.set(seen_key(namespace, "u1"), "not a set")
        client.sadd(seen_key(namespace, "u2"), "i3")
    store = SeenStore.from_url(redis_server.url, namespace, timeout_seconds=1.0, failures_to_skip=1)
    skips = Skips()
    chain = Chain([SeenFilter(store)], on_skip=skips)
    try:
        for _ in range(3):
            assert (await chain.rank(request("u1"))).skipped == ["seen_filter"]
        assert "WRONGTYPE" in str(skips.seen[0][1]) and not store.breaker.is_open
        got = await chain.rank(request("u2"))
        assert got.skipped == [] and 3 not in got.page.tolist()
    finally:
        await store.close()


async def test_redis_down_skips_the_filter_and_the_breaker_stops_calling() -> None:
    now = [100.0]
    dead = SeenStore.from_url(f"redis://127.0.0.1:{free_port()}/0", "ns", timeout_seconds=1.0)
    dead.breaker = CircuitBreaker(2, probe_interval=5.0, clock=lambda: now[0])
    skips = Skips()
    chain = Chain([SeenFilter(dead), CategoryCap()], on_skip=skips)
    plain = await Chain([CategoryCap()]).rank(request("u1", max_per_category=2))
    try:
        for _ in range(2):
            got = await chain.rank(request("u1", max_per_category=2))
            assert got.skipped == ["seen_filter"] and got.page.tolist() == plain.page.tolist()
        assert [(stage, skip.warn) for stage, skip in skips.seen] == [("seen_filter", True)] * 2
        assert "redis unreachable" in str(skips.seen[0][1]) and dead.breaker.is_open
        # Open: requests skip at once, quietly (no log line per request), without Redis.
        started = time.perf_counter()
        got = await chain.rank(request("u1", max_per_category=2))
        assert got.skipped == ["seen_filter"] and skips.seen[-1][1].warn is False
        assert time.perf_counter() - started < 0.05
        # After retry_seconds one request tries Redis again (and fails: warns again).
        now[0] += 5.0
        await chain.rank(request("u1", max_per_category=2))
        assert skips.seen[-1][1].warn is True
    finally:
        await dead.close()


async def test_a_silent_redis_costs_at_most_half_the_remaining_deadline() -> None:
    # A socket that accepts connections and never answers: Redis hung, not refused.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        store = SeenStore.from_url(f"redis://127.0.0.1:{port}/0", "ns", timeout_seconds=5.0)
        try:
            started = time.perf_counter()
            got = await Chain([SeenFilter(store)]).rank(request("u1", time_remaining=0.4))
            elapsed = time.perf_counter() - started
        finally:
            await store.close()
    assert got.skipped == ["seen_filter"] and got.total == N
    assert 0.15 < elapsed < 1.0, elapsed


def test_breaker_lets_one_trial_through_per_interval() -> None:
    now = [0.0]
    breaker = CircuitBreaker(3, probe_interval=1.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.record_failure()
    assert breaker.admit() and not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open and not breaker.admit()
    now[0] = 1.0
    assert breaker.admit()  # the trial
    assert not breaker.admit()  # the others wait for it
    assert breaker.record_success() is True and not breaker.is_open and breaker.admit()
    assert breaker.record_success() is False


class CountingClient:
    """The store's real client, counting what it sends: single commands and pipelines."""

    def __init__(self, client) -> None:
        self._client = client
        self.commands = 0
        self.pipelines = 0

    async def smembers(self, *args):
        self.commands += 1
        return await self._client.smembers(*args)

    async def smismember(self, *args):
        self.commands += 1
        return await self._client.smismember(*args)

    def pipeline(self, **kwargs):
        self.pipelines += 1
        return self._client.pipeline(**kwargs)

    async def aclose(self) -> None:
        await self._client.aclose()


def calls(url: str, command: str) -> int:
    with redis.Redis.from_url(url) as client:
        return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


async def one_by_one(store: SeenStore, queries) -> list:
    out = []
    for user_id, item_ids in queries:
        try:
            out.append((await store.seen(user_id, item_ids)).tolist())
        except StageSkipped as skip:
            out.append(str(skip))
    return out


def as_comparable(found: list) -> list:
    return [str(f) if isinstance(f, StageSkipped) else f.tolist() for f in found]


@pytest.mark.parametrize(("lookup", "command"), [("members", "smembers"), ("ismember", "smismember")])
async def test_seen_many_is_one_round_trip_and_each_query_gets_what_seen_gives(
    redis_server: RedisServer, namespace: str, lookup: str, command: str
) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.sadd(seen_key(namespace, "u1"), "i1", "i3")
        client.sadd(seen_key(namespace, "u2"), "i2")
        client.set(seen_key(namespace, "bad"), "not a set")
    queries = [("u1", ["i1", "i2", "i3"]), ("u2", ["i1", "i2"]), ("bad", ["i1"]), ("u1", ["i3", "i9"]), ("u3", ["i1"])]
    store = SeenStore.from_url(redis_server.url, namespace, timeout_seconds=1.0, lookup=lookup)
    counting = store._client = CountingClient(store._client)  # type: ignore[assignment]
    try:
        before = calls(redis_server.url, command)
        found = await store.seen_many(queries)
        # One pipeline, no command of its own; by members each user's set is read once.
        assert (counting.pipelines, counting.commands) == (1, 0)
        assert calls(redis_server.url, command) - before == (4 if lookup == "members" else 5)
        assert as_comparable(found) == await one_by_one(store, queries)
        assert as_comparable(found)[:2] == [[True, False, True], [False, True]]
        assert "WRONGTYPE" in str(found[2]) and not store.breaker.is_open
    finally:
        await store.close()


async def test_seen_many_an_undecodable_set_fails_its_query_alone(redis_server: RedisServer, namespace: str) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.sadd(seen_key(namespace, "u1"), "i1")
        client.sadd(seen_key(namespace, "binary"), b"\xff\xfe")
    store = SeenStore.from_url(redis_server.url, namespace, timeout_seconds=1.0)
    try:
        queries = [("u1", ["i1", "i2"]), ("binary", ["i1"])]
        found = await store.seen_many(queries)
        assert as_comparable(found) == await one_by_one(store, queries)
        assert found[0].tolist() == [True, False] and "unreadable seen set" in str(found[1])
    finally:
        await store.close()


async def test_seen_many_with_redis_down_skips_every_query_and_counts_one_failure() -> None:
    dead = SeenStore.from_url(f"redis://127.0.0.1:{free_port()}/0", "ns", timeout_seconds=1.0, failures_to_skip=2)
    try:
        found = await dead.seen_many([("u1", ["i1"]), ("u2", ["i2"])])
        assert all(isinstance(f, StageSkipped) and f.warn and "redis unreachable" in str(f) for f in found)
        assert not dead.breaker.is_open  # one round trip failed, one failure counted
        await dead.seen_many([("u1", ["i1"])])
        assert dead.breaker.is_open
        quiet = await dead.seen_many([("u1", ["i1"])])
        assert [(str(f), f.warn) for f in quiet] == [("redis unreachable (circuit open)", False)]
    finally:
        await dead.close()


async def test_a_prefetched_chain_ranks_as_the_chain_that_reads_for_itself(
    redis_server: RedisServer, namespace: str
) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.sadd(seen_key(namespace, "u1"), "i3", "i7")
        client.sadd(seen_key(namespace, "u2"), "i4")
    store = SeenStore.from_url(redis_server.url, namespace, timeout_seconds=1.0)
    chain = Chain([SeenFilter(store), CategoryCap()])
    try:
        batch = [request("u1", explain=True, max_per_category=3), request("u2"), request("")]
        await chain.prefetch(batch)
        assert [c.seen is not None for c in batch] == [True, True, False]
        for prefetched, user_id in zip(batch, ("u1", "u2", ""), strict=False):
            alone = await chain.rank(
                request(user_id, explain=prefetched.explain, max_per_category=prefetched.max_per_category)
            )
            got = await chain.rank(prefetched)
            assert (got.page.tolist(), got.total, got.skipped) == (alone.page.tolist(), alone.total, alone.skipped)
            assert got.explanations == alone.explanations
    finally:
        await store.close()
