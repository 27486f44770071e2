"""The feature store against a real redis-server of this module's own.

Acceptance: a 200-entity read is one Redis round trip (INFO commandstats), values come back
byte-identical to the ingested data, per-entity TTL is honoured (in Redis and in the local
cache), and readers never see a mix of two materializations while a view is re-ingested.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from infermesh.features.ingest import ingest
from infermesh.up.supervisor import free_port, start_redis
from infermesh.workload.catalog import generate_catalog
from infermesh.workload.seed import load_into_redis
from services.features.cache import LocalCache
from services.features.layout import pointer_key
from services.features.registry import Registry, parse_registry
from services.features.store import FeatureStore
from services.runtime.breaker import CircuitBreaker

REGISTRY = parse_registry(
    yaml.safe_load("""
entities:
  item: {id_column: item_id}
  user: {id_column: user_id}
views:
  emb:
    entity: item
    key: e
    features:
      - {name: vec, dtype: float32, shape: 8, default: 0.5}
      - {name: cat, dtype: int32, default: -1}
      - {name: score, dtype: float64, default: 0}
  flags:
    entity: item
    key: f
    features:
      - {name: clicks, dtype: int64, default: 0}
  short:
    entity: item
    key: s
    ttl_seconds: 1
    features:
      - {name: x, dtype: float32, default: -1}
  user:
    entity: user
    key: u
    timestamped: false
    features:
      - {name: vec, dtype: float32, shape: 32}
  item:
    entity: item
    key: i
    timestamped: false
    features:
      - {name: vec, dtype: float32, shape: 32}
      - {name: category, dtype: int32}
      - {name: price, dtype: float32}
reference: {user_view: user, item_view: item, vector_feature: vec, category_feature: category}
""")
)
N = 300


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("features-store-redis")
    port = free_port()
    process = start_redis(workdir, port, workdir / "logs", persist=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def admin(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def client(redis_url: str):
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def make_store(
    client: aioredis.Redis, namespace: str, registry: Registry = REGISTRY, cache_ttl: float = 0.0, cache_bytes: int = 0
) -> FeatureStore:
    return FeatureStore(
        client, namespace, 1000, registry=registry, cache=LocalCache(cache_bytes, cache_ttl), breaker=CircuitBreaker()
    )


async def ready_store(client: aioredis.Redis, namespace: str, **kwargs: float) -> FeatureStore:
    """A store that has followed the views' pointers, as the service does at start and every second."""
    store = make_store(client, namespace, **kwargs)  # type: ignore[arg-type]
    await store.refresh()
    return store


def data_commands(admin: redis.Redis) -> dict[str, int]:
    """Calls per command so far, leaving out INFO itself."""
    stats = admin.info("commandstats")
    return {name: s["calls"] for name, s in stats.items() if name != "cmdstat_info"}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def emb_data(seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = [f"i{i}" for i in range(N)]
    return ids, rng.standard_normal((N, 8)).astype(np.float32), rng.integers(-5, 50, N).astype(np.int32), rng.random(N)


def write_emb_csv(path: Path, ids: list[str], vec: np.ndarray, cat: np.ndarray, score: np.ndarray) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item_id", *(f"vec_{i}" for i in range(8)), "cat", "score"])
        for i, entity in enumerate(ids):
            # repr of a float32 as float64 is exact, so the file holds exactly these values.
            writer.writerow([entity, *(repr(float(v)) for v in vec[i]), int(cat[i]), repr(float(score[i]))])
    return path


def write_single_csv(path: Path, column: str, ids: list[str], value: float) -> Path:
    path.write_text("item_id," + column + "\n" + "".join(f"{entity},{value}\n" for entity in ids))
    return path


async def test_a_200_entity_read_is_one_redis_round_trip(client: aioredis.Redis, admin: redis.Redis) -> None:
    catalog = generate_catalog(seed=3, n_users=20, n_items=1_000, n_categories=10)
    load_into_redis(admin, catalog, namespace="rt", progress=False)
    store = await ready_store(client, "rt", cache_bytes=1 << 24, cache_ttl=60)
    items = [f"i{n}" for n in range(0, 1_000, 5)]
    assert len(items) == 200

    before = data_commands(admin)
    rows = await store.get("u7", items)
    assert delta(before, data_commands(admin)) == {"cmdstat_mget": 1}

    matrix = np.frombuffer(rows.model_input, "<f4").reshape(200, 64)
    index = [int(i[1:]) for i in items]
    assert matrix[:, :32].tobytes() == np.repeat(catalog.user_vecs[7][None], 200, 0).tobytes()
    assert matrix[:, 32:].tobytes() == catalog.item_vecs[index].tobytes()
    assert np.frombuffer(rows.item_categories, "<i4").tolist() == catalog.item_category[index].tolist()

    before = data_commands(admin)
    again = await store.get("u7", items)  # hot: the local cache answers
    assert delta(before, data_commands(admin)) == {} and again.model_input == rows.model_input


async def test_view_reads_are_byte_identical_to_the_ingested_file(
    client: aioredis.Redis, admin: redis.Redis, tmp_path: Path
) -> None:
    ids, vec, cat, score = emb_data()
    report = ingest(
        admin,
        REGISTRY,
        "emb",
        write_emb_csv(tmp_path / "emb.csv", ids, vec, cat, score),
        namespace="bi",
        progress=False,
    )
    assert report.rows_written == N and not report.bad_rows
    store = await ready_store(client, "bi")
    order = np.random.default_rng(1).permutation(N)[:199]
    wanted = [ids[i] for i in order] + ["unknown"]

    before = data_commands(admin)
    got = await store.get_views(["emb"], wanted)
    assert delta(before, data_commands(admin)) == {"cmdstat_mget": 1}

    expected = np.empty((200, 10), dtype="<f4")
    expected[:199, :8], expected[:199, 8], expected[:199, 9] = vec[order], cat[order], score[order]
    expected[199] = [0.5] * 8 + [-1, 0]  # the view's defaults
    assert got.rows == 200 and got.columns == REGISTRY.views["emb"].columns
    assert got.matrix == expected.tobytes()
    assert np.frombuffer(got.present, np.uint8).tolist() == [1] * 199 + [0]
    age = np.frombuffer(got.freshness_seconds, "<f4")
    assert np.isinf(age[199]) and ((age[:199] >= 0) & (age[:199] < 60)).all()
    assert not got.degraded

    # The stored record holds the file's values in the declared dtypes, bit for bit.
    record = np.frombuffer(admin.get(f"{report.prefix}:e:i7"), dtype=REGISTRY.views["emb"].record_dtype)[0]
    assert record["vec"].tobytes() == vec[7].tobytes()
    assert int(record["cat"]) == cat[7] and float(record["score"]) == score[7]


async def test_several_views_of_one_entity_in_one_round_trip(
    client: aioredis.Redis, admin: redis.Redis, tmp_path: Path
) -> None:
    ids, vec, cat, score = emb_data(seed=5)
    ingest(
        admin,
        REGISTRY,
        "emb",
        write_emb_csv(tmp_path / "emb.csv", ids, vec, cat, score),
        namespace="mv",
        progress=False,
    )
    ingest(
        admin,
        REGISTRY,
        "flags",
        write_single_csv(tmp_path / "f.csv", "clicks", ids[:100], 12345678901),
        namespace="mv",
        progress=False,
    )
    store = await ready_store(client, "mv")
    before = data_commands(admin)
    got = await store.get_views(["emb", "flags"], ["i3", "i150"])
    assert delta(before, data_commands(admin)) == {"cmdstat_mget": 1}
    matrix = np.frombuffer(got.matrix, "<f4").reshape(2, 11)
    assert matrix[0, 10] == np.float32(12345678901) and matrix[1, 10] == 0  # i150 has no flags row
    assert np.frombuffer(got.present, np.uint8).reshape(2, 2).tolist() == [[1, 1], [1, 0]]


async def test_ttl_expiry_is_honoured_in_redis_and_in_the_local_cache(
    client: aioredis.Redis, admin: redis.Redis, tmp_path: Path
) -> None:
    ids = [f"i{i}" for i in range(50)]
    report = ingest(
        admin, REGISTRY, "short", write_single_csv(tmp_path / "s.csv", "x", ids, 7.0), namespace="ttl", progress=False
    )
    assert 0 < admin.pttl(f"{report.prefix}:s:i1") <= 1000
    cached = make_store(client, "ttl", cache_bytes=1 << 20, cache_ttl=60)  # cache TTL far beyond the view's
    first = await cached.get_views(["short"], ids)
    assert np.frombuffer(first.present, np.uint8).all()
    assert (np.frombuffer(first.matrix, "<f4") == 7.0).all()

    time.sleep(1.2)
    for store in (cached, make_store(client, "ttl")):
        later = await store.get_views(["short"], ids)
        assert not np.frombuffer(later.present, np.uint8).any()
        assert (np.frombuffer(later.matrix, "<f4") == -1.0).all()  # the view's default
        assert not later.degraded
    assert admin.exists(f"{report.prefix}:s:i1") == 0


async def test_readers_never_see_a_mix_of_materializations(
    client: aioredis.Redis, admin: redis.Redis, tmp_path: Path
) -> None:
    ids = [f"i{i}" for i in range(2_000)]
    files = {v: write_single_csv(tmp_path / f"v{v}.csv", "clicks", ids, v) for v in (1, 2)}
    ingest(admin, REGISTRY, "flags", files[1], namespace="mix", progress=False)
    readers = [make_store(client, "mix"), make_store(client, "mix", cache_bytes=1 << 22, cache_ttl=0.02)]
    wanted = ids[::10]
    seen: list[set[float]] = []
    done = asyncio.Event()

    async def read(store: FeatureStore) -> None:
        while not done.is_set():
            got = await store.get_views(["flags"], wanted)
            assert np.frombuffer(got.present, np.uint8).all(), "a reader saw a half-written or removed view"
            seen.append(set(np.frombuffer(got.matrix, "<f4").tolist()))
            await asyncio.sleep(0)

    def rematerialize() -> None:
        try:
            for n in range(4):
                ingest(admin, REGISTRY, "flags", files[2 if n % 2 == 0 else 1], namespace="mix", progress=False)
                time.sleep(0.05)
        finally:
            done.set()

    await asyncio.gather(asyncio.to_thread(rematerialize), *(read(s) for s in readers))
    assert all(len(values) == 1 for values in seen), [v for v in seen if len(v) > 1][:3]
    assert {v for values in seen for v in values} == {1.0, 2.0}
    assert admin.get(pointer_key("mix", "flags")) == b"mix:mat:flags:5"
    # Superseded materializations are removed: only the serving one's rows (+ its meta) remain.
    assert len(list(admin.scan_iter(match="mix:mat:*", count=1000))) == len(ids) + 1


async def test_redis_down_serves_stale_entries_and_opens_the_breaker(tmp_path: Path) -> None:
    """Store level: Redis stopped -> degraded answers from the cache, then the breaker stops calling it."""
    port = free_port()
    process = start_redis(tmp_path, port, tmp_path / "logs", persist=False)
    url = f"redis://127.0.0.1:{port}/0"
    sync = redis.Redis.from_url(url)
    catalog = generate_catalog(seed=3, n_users=5, n_items=50, n_categories=5)
    load_into_redis(sync, catalog, namespace="rs", progress=False)
    aclient = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    store = make_store(aclient, "rs", cache_bytes=1 << 20, cache_ttl=0.0)
    try:
        assert not (await store.get("u1", ["i1", "i2"])).degraded
        process.terminate()
        process.wait(timeout=10)
        for _ in range(4):
            rows = await store.get("u1", ["i1", "i2"])
            assert rows.degraded and rows.missing_items == 0  # stale entries, still served
        assert store.breaker is not None and store.breaker.is_open
        assert not await store.ping()
    finally:
        if process.poll() is None:
            process.kill()
        sync.close()
        await aclient.aclose()
