"""Shared fixtures: a redis-server of the tests' own, the seeded reference data, a mesh.

Nothing here touches a Redis the tests did not start (never 127.0.0.1:6379) and every
port is picked free, so the suite runs beside a developer's own `infermesh up`.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from infermesh.up.supervisor import Mesh, free_port, free_topology, start_redis
from infermesh.workload.seed import model_repository, seed_all


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]

    def url_for(self, db: int) -> str:
        """A database of a test module's own on this server."""
        return f"redis://127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = start_redis(workdir, port, workdir / "logs", persist=False)
    try:
        yield RedisServer(f"redis://127.0.0.1:{port}/0", port, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def redis_namespace(redis_server: RedisServer) -> Iterator[str]:
    """A key prefix of this test's own on the session's Redis; its keys go afterwards."""
    namespace = f"test:{uuid.uuid4().hex}"
    yield namespace
    with redis.Redis.from_url(redis_server.url) as client:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Path:
    """The full reference catalog in the test Redis and the trained ranker on disk."""
    data_dir = tmp_path_factory.mktemp("data")
    seed_all(data_dir, redis_server.url, progress=False)
    return data_dir


# A catalog a mesh of a test's own seeds in seconds (the reference one takes ~10 s).
SMALL_CATALOG = {"n_users": 30, "n_items": 3_000, "n_categories": 10}


def seed_small(workdir: Path, redis_url: str, seed: int, *, force: bool = False, **catalog: int) -> None:
    """A small catalog, model and candidate index of the test's own (SMALL_CATALOG unless
    `catalog` says otherwise) in `workdir` and the Redis at `redis_url`."""
    seed_all(workdir, redis_url, seed=seed, progress=False, train_steps=50, force=force, **{**SMALL_CATALOG, **catalog})


@contextmanager
def running_mesh(
    data_dir: Path,
    redis_url: str,
    replicas: Mapping[str, int],
    *,
    extra_env: Mapping[str, str] | None = None,
    repository: Path | None = None,
    **options: Any,
) -> Iterator[Mesh]:
    """A mesh on free ports over `data_dir`'s seeded data, no trace export unless
    `extra_env` says otherwise; started (healthy) on entry, stopped on exit."""
    mesh = Mesh(
        topology=free_topology(replicas),
        data_dir=data_dir,
        redis_url=redis_url,
        model_repository=repository or model_repository(data_dir),
        log_dir=data_dir / "logs",
        extra_env={"OTEL_TRACES_EXPORTER": "none", **(extra_env or {})},
        **options,
    )
    try:
        mesh.start(timeout=90)
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="session")
def mesh(reference_data: Path, redis_server: RedisServer) -> Iterator[Mesh]:
    """The whole mesh as `infermesh up` runs it: real Envoy, Redis and ONNX Runtime."""
    with running_mesh(reference_data, redis_server.url, {"scoring": 2}) as running:
        yield running
