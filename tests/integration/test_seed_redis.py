"""Seeding a real redis-server: record bytes, meta document, idempotence.

Each module run starts its own throwaway redis-server on a free port (never 6379) with
persistence off, and kills it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from infermesh.up.supervisor import free_port, start_redis
from infermesh.workload.catalog import Catalog, generate_catalog
from infermesh.workload.seed import SeedError, is_seeded, load_into_redis, seed_all
from services.features.layout import ITEM_RECORD, USER_RECORD, item_key, meta_key, user_key
from tests.processes import stop

N_USERS, N_ITEMS, N_CATEGORIES = 300, 2_000, 10
SMALL = {"n_users": N_USERS, "n_items": N_ITEMS, "n_categories": N_CATEGORIES}


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = start_redis(workdir, port, workdir / "logs", persist=False)
    try:
        yield port
    finally:
        stop(process)


@pytest.fixture
def client(redis_port: int) -> Iterator[redis.Redis]:
    c = redis.Redis(port=redis_port)
    c.flushdb()  # our own server: every test starts from an empty database
    yield c
    c.close()


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return generate_catalog(seed=11, **SMALL)


def test_load_writes_exact_record_bytes(client: redis.Redis, catalog: Catalog) -> None:
    ns = "test:ws"
    written = load_into_redis(client, catalog, namespace=ns, progress=False)
    assert written == N_USERS + N_ITEMS + 1
    assert client.dbsize() == written

    rng = np.random.default_rng(0)
    user = 123
    items = rng.choice(N_ITEMS, 200, replace=False)
    keys = [user_key(ns, catalog.user_ids[user])] + [item_key(ns, catalog.item_ids[i]) for i in items]
    raw = client.mget(keys)
    assert all(isinstance(r, bytes) for r in raw)

    u = np.frombuffer(raw[0], dtype=USER_RECORD)
    np.testing.assert_array_equal(u["vec"][0], catalog.user_vecs[user])
    recs = np.frombuffer(b"".join(raw[1:]), dtype=ITEM_RECORD)
    np.testing.assert_array_equal(recs["vec"], catalog.item_vecs[items])
    np.testing.assert_array_equal(recs["category"], catalog.item_category[items])
    np.testing.assert_array_equal(recs["price"], catalog.item_price[items])


def test_meta_and_is_seeded(client: redis.Redis, catalog: Catalog) -> None:
    ns = "test:meta"
    assert not is_seeded(client, ns, 11, **SMALL)
    load_into_redis(client, catalog, namespace=ns, progress=False)

    meta = json.loads(client.get(meta_key(ns)))
    assert {k: meta[k] for k in ("seed", "n_users", "n_items", "n_categories", "feature_dim", "model")} == {
        "seed": 11,
        **SMALL,
        "feature_dim": 32,
        "model": "ranker",
    }
    assert meta["created_at"]

    assert is_seeded(client, ns, 11, **SMALL)
    assert not is_seeded(client, ns, 12, **SMALL)
    assert not is_seeded(client, ns, 11, n_users=N_USERS, n_items=N_ITEMS + 1, n_categories=N_CATEGORIES)
    assert not is_seeded(client, "test:other", 11, **SMALL)

    client.delete(item_key(ns, f"i{N_ITEMS - 1}"))  # records lost behind the meta's back
    assert not is_seeded(client, ns, 11, **SMALL)


def test_seed_all_is_idempotent(client: redis.Redis, redis_port: int, tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"
    kwargs = dict(namespace="test:all", seed=11, progress=False, train_steps=20, **SMALL)
    seen_sets = N_USERS  # one seen-items set per user

    first = seed_all(tmp_path, url, **kwargs)
    assert first["model_trained"] and first["redis_loaded"]
    assert first["keys_written"] == N_USERS + N_ITEMS + 1
    assert Path(first["model_path"]).is_file()
    model_bytes = Path(first["model_path"]).read_bytes()
    # The model carries its provenance, which the scoring server returns in ModelMetadata.
    provenance = json.loads((Path(first["model_path"]).parent / "provenance.json").read_text())
    assert provenance["owner"] and provenance["source_revision"]
    assert provenance["training_data_digest"].startswith("sha256:")
    created = json.loads(client.get(meta_key("test:all")))["created_at"]
    sample = client.get(item_key("test:all", "i7"))

    second = seed_all(tmp_path, url, **kwargs)
    assert not second["model_trained"] and not second["redis_loaded"] and second["keys_written"] == 0
    assert client.dbsize() == N_USERS + N_ITEMS + 1 + seen_sets
    assert json.loads(client.get(meta_key("test:all")))["created_at"] == created

    forced = seed_all(tmp_path, url, force=True, **kwargs)
    assert forced["model_trained"] and forced["redis_loaded"]
    assert Path(forced["model_path"]).read_bytes() == model_bytes  # deterministic retrain
    assert client.get(item_key("test:all", "i7")) == sample
    assert client.dbsize() == N_USERS + N_ITEMS + 1 + seen_sets

    other_seed = seed_all(tmp_path / "other", url, **{**kwargs, "seed": 12, "namespace": "test:other"})
    other = json.loads((Path(other_seed["model_path"]).parent / "provenance.json").read_text())
    assert other["training_data_digest"] != provenance["training_data_digest"]  # other data, other digest


def test_unreachable_redis_raises_seed_error(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(SeedError, match="redis-server") as info:
        seed_all(tmp_path, url, progress=False, **SMALL)
    assert url in str(info.value)
    assert not (tmp_path / "models").exists()  # failed before spending time on training
