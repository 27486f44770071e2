"""Seeding the seen-items sets ranking's seen filter reads, in the tests' redis-server under
a namespace of this module's own: contents, replacement on reload, and is_seeded."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from infermesh.workload.catalog import generate_catalog, seen_items
from infermesh.workload.seed import is_seeded, load_into_redis
from services.features.layout import meta_key
from services.ranking.layout import seen_key
from tests.conftest import RedisServer

SMALL = {"n_users": 60, "n_items": 500, "n_categories": 6}


@pytest.fixture
def client(redis_server: RedisServer, redis_namespace: str) -> Iterator[tuple[redis.Redis, str]]:
    with redis.Redis.from_url(redis_server.url) as c:
        yield c, redis_namespace


def test_seen_items_are_deterministic_distinct_and_seed_dependent() -> None:
    a = seen_items(3, 1000, 500, 20)
    assert a.shape == (1000, 20) and a.min() >= 0 and a.max() < 500
    assert all(len(set(row)) == 20 for row in a.tolist())
    assert np.array_equal(a, seen_items(3, 1000, 500, 20))
    assert not np.array_equal(a, seen_items(4, 1000, 500, 20))
    assert seen_items(3, 5, 10, 20).shape == (5, 10)  # never more than the catalog holds


def test_load_writes_each_users_seen_set_before_the_meta(client: tuple[redis.Redis, str]) -> None:
    c, namespace = client
    catalog = generate_catalog(seed=13, **SMALL)
    written = load_into_redis(c, catalog, namespace, progress=False, seen_per_user=15)
    assert written == SMALL["n_users"] + SMALL["n_items"] + 1  # seen sets are not feature keys
    expected = seen_items(13, SMALL["n_users"], SMALL["n_items"], 15)
    for user in (0, 17, SMALL["n_users"] - 1):
        members = {m.decode() for m in c.smembers(seen_key(namespace, f"u{user}"))}
        assert members == {f"i{i}" for i in expected[user].tolist()}
    assert json.loads(c.get(meta_key(namespace)))["seen_per_user"] == 15
    assert is_seeded(c, namespace, 13, **SMALL, seen_per_user=15)
    # A namespace seeded without seen sets (or with another count) is not seeded for 15.
    assert not is_seeded(c, namespace, 13, **SMALL, seen_per_user=20)
    c.delete(seen_key(namespace, "u0"))
    assert not is_seeded(c, namespace, 13, **SMALL, seen_per_user=15)


def test_reload_replaces_seen_sets_instead_of_merging(client: tuple[redis.Redis, str]) -> None:
    c, namespace = client
    catalog = generate_catalog(seed=13, **SMALL)
    load_into_redis(c, catalog, namespace, progress=False, seen_per_user=15)
    c.sadd(seen_key(namespace, "u5"), "i-stale")
    load_into_redis(c, catalog, namespace, progress=False, seen_per_user=15)
    members = {m.decode() for m in c.smembers(seen_key(namespace, "u5"))}
    assert "i-stale" not in members and len(members) == 15
    # Without seen sets, load_into_redis writes none and says so in the meta.
    other = f"{namespace}:plain"
    load_into_redis(c, catalog, other, progress=False)
    assert not c.exists(seen_key(other, "u0"))
    assert json.loads(c.get(meta_key(other)))["seen_per_user"] == 0
    assert is_seeded(c, other, 13, **SMALL)
