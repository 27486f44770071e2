"""Shared fixtures: a redis-server of the tests' own, the seeded reference data, a mesh.

Nothing here touches a Redis the tests did not start (never 127.0.0.1:6379) and every
port is picked free, so the suite runs beside a developer's own `infermesh up`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.mesh.supervisor import DESCRIPTOR_SET, Mesh, free_port, start_redis
from services.mesh.topology import BACKENDS, SERVICES, Endpoint, MeshTopology
from services.workload.seed import model_repository, seed_all


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]


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


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Path:
    """The full reference catalog in the test Redis and the trained ranker on disk."""
    data_dir = tmp_path_factory.mktemp("data")
    seed_all(data_dir, redis_server.url, progress=False)
    return data_dir


def free_topology(replicas: dict[str, int]) -> MeshTopology:
    return MeshTopology(
        replicas={
            name: tuple(Endpoint("127.0.0.1", free_port()) for _ in range(replicas.get(name, 1)))
            for name in SERVICES
        },
        descriptor_set=DESCRIPTOR_SET,
        edge_port=free_port(),
        admin_port=free_port(),
        internal_ports={name: free_port() for name in BACKENDS},
    )


@pytest.fixture(scope="session")
def mesh(reference_data: Path, redis_server: RedisServer) -> Iterator[Mesh]:
    """The whole mesh as `infermesh up` runs it: real Envoy, Redis and ONNX Runtime."""
    running = Mesh(
        topology=free_topology({"scoring": 2}),
        data_dir=reference_data,
        redis_url=redis_server.url,
        model_repository=model_repository(reference_data),
        log_dir=reference_data / "logs",
    )
    try:
        running.start(timeout=90)
        yield running
    finally:
        running.stop()
