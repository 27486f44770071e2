"""Recommend through a real mesh of this module's own (own Redis, own Envoy, own services)
while its Redis is stopped and started again, plus the retrieval stage.

Acceptance: during a bounded load test, stopping Redis fails no Recommend request; the
responses are flagged degraded while it is down; within 5 s of Redis returning they are
not degraded any more. The session `mesh` fixture is not touched.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from infermesh.up.supervisor import Mesh
from infermesh.workload.catalog import generate_catalog
from services.features.retrieval import exact_top
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import SMALL_CATALOG, running_mesh, seed_small
from tests.processes import start_socket_redis, stop

SEED = 5
K = 10
# Load-test bounds: loopback only, at most this many requests and seconds.
MAX_REQUESTS = 20_000
MAX_SECONDS = 16.0
CONCURRENCY = 4


@dataclass
class OwnMesh:
    mesh: Mesh
    workdir: Path
    redis: subprocess.Popen[bytes]

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.mesh.topology.edge_port}"


@pytest.fixture(scope="module")
def own_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnMesh]:
    workdir = tmp_path_factory.mktemp("features-e2e")
    redis_process = start_socket_redis(workdir)
    url = f"unix://{workdir / 'redis.sock'}?db=0"
    # A small catalog, model and candidate index of our own: seconds, not the full seed.
    seed_small(workdir, url, SEED)
    extra_env = {
        "FEATURES_CACHE_TTL_SECONDS": "0.2",  # entries go stale fast: requests keep reaching Redis
        "FEATURES_REDIS_TIMEOUT_SECONDS": "0.3",
        "FEATURES_BREAKER_PROBE_SECONDS": "0.25",
    }
    running: OwnMesh | None = None
    try:
        with running_mesh(workdir, url, {"scoring": 1}, extra_env=extra_env) as mesh:
            running = OwnMesh(mesh, workdir, redis_process)
            yield running
    finally:
        stop(running.redis if running is not None else redis_process)  # a test restarts Redis


def test_recommend_retrieves_candidates_when_none_are_given(own_mesh: OwnMesh) -> None:
    catalog = generate_catalog(seed=SEED, **SMALL_CATALOG)
    with grpc.insecure_channel(own_mesh.edge) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
            gateway_pb2.RecommendRequest(user_id="u3", retrieve_candidates=100, k=K), timeout=10
        )
    assert len(reply.items) == K and not reply.degraded
    top = {f"i{i}" for i in exact_top(catalog.item_vecs, catalog.user_vecs[3], 100)}
    assert {item.item_id for item in reply.items} <= top
    assert {t.stage for t in reply.stage_timings} == {"retrieval", "features", "scoring", "ranking"}

    body = json.dumps({"user_id": "u4", "retrieve_candidates": 50, "k": 5}).encode()
    request = urllib.request.Request(
        f"http://{own_mesh.edge}/v1/recommend", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and len(json.loads(response.read())["items"]) == 5


@dataclass
class Outcome:
    at: float
    degraded: bool
    items: int


@dataclass
class LoadLog:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def load_through_an_outage(own_mesh: OwnMesh) -> tuple[LoadLog, float, float, float]:
    """Recommend at CONCURRENCY while Redis goes down at ~1.5 s and comes back at ~4 s."""
    requests = [
        gateway_pb2.RecommendRequest(
            user_id=f"u{u}", candidate_ids=[f"i{(u * 97 + n * 13) % 3_000}" for n in range(50)], k=K
        )
        for u in range(5)
    ]
    log = LoadLog()
    channel = grpc.aio.insecure_channel(own_mesh.edge)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    started = time.monotonic()
    stop_at = started + MAX_SECONDS
    sent = 0
    marks: dict[str, float] = {}

    async def worker(offset: int) -> None:
        nonlocal sent
        n = offset
        while time.monotonic() < stop_at and sent < MAX_REQUESTS:
            if "back" in marks and time.monotonic() > marks["back"] + 5.5:
                return
            sent += 1
            try:
                reply = await stub.Recommend(requests[n % len(requests)], timeout=2.0)
            except grpc.aio.AioRpcError as error:
                log.failures.append(f"{error.code().name}: {error.details()}")
            else:
                log.outcomes.append(Outcome(time.monotonic(), reply.degraded, len(reply.items)))
            n += 1

    async def outage() -> None:
        await asyncio.sleep(1.5)
        marks["stopping"] = time.monotonic()
        await asyncio.to_thread(stop, own_mesh.redis)
        marks["down"] = time.monotonic()
        await asyncio.sleep(2.5)
        own_mesh.redis = await asyncio.to_thread(start_socket_redis, own_mesh.workdir)
        marks["back"] = time.monotonic()

    await asyncio.gather(outage(), *(worker(i) for i in range(CONCURRENCY)))
    await channel.close()
    return log, marks["stopping"], marks["down"], marks["back"]


def test_stopping_redis_under_load_fails_nothing_and_recovers_within_5s(own_mesh: OwnMesh) -> None:
    log, stopping, down, back = asyncio.run(load_through_an_outage(own_mesh))
    assert log.failures == [], log.failures[:5]
    before = [o for o in log.outcomes if o.at < stopping]
    during = [o for o in log.outcomes if down + 0.5 < o.at < back]
    after = [o for o in log.outcomes if o.at > back]
    assert before and during and after
    assert not any(o.degraded for o in before[len(before) // 2 :])
    # While Redis is down the answers come from stale cache entries, so they are still full lists.
    assert sum(o.degraded for o in during) >= 0.9 * len(during)
    assert all(o.items == K for o in log.outcomes)
    # Recovery: from some moment within 5 s of Redis returning, nothing is degraded any more.
    last_degraded = max((o.at for o in after if o.degraded), default=back)
    assert last_degraded - back < 5.0, f"degraded {last_degraded - back:.2f}s after Redis returned"
    assert any(o.at > last_degraded for o in after)
    print(
        f"stop took {down - stopping:.2f}s; {len(log.outcomes)} requests; {len(during)} during the outage; "
        f"recovered {last_degraded - back:.2f}s after Redis returned"
    )
