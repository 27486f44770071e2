"""The ranking service as a process (`python -m services.ranking`) over gRPC, reading the
seen-items sets `infermesh seed` writes from a redis-server of this module's own, which
the last test stops and starts again: with Redis down ranking still answers, without the
seen filter, reported in skipped_stages, counted, logged, and health stays SERVING.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.ranking.rank import RankInput, top_k
from infermesh.workload.catalog import Catalog, generate_catalog, seen_items
from infermesh.workload.seed import load_into_redis
from tests.processes import ServiceProcess, running_service, start_socket_redis, stop

NAMESPACE = "test:ranking-svc"
SEEN_PER_USER = 20


@dataclass
class Running:
    workdir: Path
    redis: subprocess.Popen[bytes]
    redis_url: str
    service: ServiceProcess
    stub: ranking_pb2_grpc.RankingServiceStub
    catalog: Catalog

    def seed(self) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            load_into_redis(client, self.catalog, NAMESPACE, progress=False, seen_per_user=SEEN_PER_USER)

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metric(name, **labels)

    def serving(self) -> bool:
        return self.service.serving()

    def log_lines(self) -> list[dict]:
        return self.service.log_lines()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("ranking-svc")
    redis_process = start_socket_redis(workdir, persist=False)
    url = f"unix://{workdir / 'redis.sock'}?db=0"
    catalog = generate_catalog(seed=5, n_users=40, n_items=2_000, n_categories=8)
    env = {
        "RANKING_REDIS_URL": url,
        "RANKING_NAMESPACE": NAMESPACE,
        "RANKING_REDIS_TIMEOUT_SECONDS": "0.3",
        "RANKING_REDIS_FAILURES_TO_SKIP": "2",
        "RANKING_REDIS_RETRY_SECONDS": "0.2",
    }
    running: Running | None = None
    try:
        with running_service("ranking", env, workdir / "ranking.log") as service:
            running = Running(
                workdir, redis_process, url, service, ranking_pb2_grpc.RankingServiceStub(service.channel), catalog
            )
            running.seed()
            yield running
    finally:
        stop(running.redis if running is not None else redis_process)  # the last test restarts Redis


USER = 3


@dataclass(frozen=True)
class Case:
    request: ranking_pb2.RankRequest
    seen: set[int]  # request positions of the user's seen items
    scores: np.ndarray
    categories: np.ndarray


def case(catalog: Catalog, **fields) -> Case:
    """100 candidates for user u3: their 20 seen items among 80 others, shuffled."""
    rng = np.random.default_rng(11)
    seen = seen_items(catalog.seed, catalog.n_users, catalog.n_items, SEEN_PER_USER)[USER]
    others = rng.choice(np.setdiff1d(np.arange(catalog.n_items), seen), 80, replace=False)
    items = rng.permutation(np.concatenate([seen, others]))
    scores = rng.random(len(items)).astype("<f4")
    categories = catalog.item_category[items].astype("<i4")
    request = ranking_pb2.RankRequest(
        item_ids=[catalog.item_ids[i] for i in items.tolist()],
        scores=scores.tobytes(),
        item_categories=categories.tobytes(),
        user_id=f"u{USER}",
        **fields,
    )
    return Case(request, set(np.flatnonzero(np.isin(items, seen)).tolist()), scores, categories)


def expected_ids(c: Case, k: int, cap: int, filtered: bool) -> list[str]:
    present = np.ones(len(c.scores), bool)
    if filtered:
        present[list(c.seen)] = False
    chosen = top_k(RankInput(c.scores, c.categories, present), k, cap)
    return [c.request.item_ids[i] for i in chosen.tolist()]


def test_seen_items_written_by_seed_are_filtered(running: Running) -> None:
    c = case(running.catalog, k=10, max_per_category=3, explain=True)
    reply = running.stub.Rank(c.request, timeout=5)
    assert list(reply.skipped_stages) == []
    assert [item.item_id for item in reply.items] == expected_ids(c, 10, 3, filtered=True)
    seen_ids = {c.request.item_ids[i] for i in c.seen}
    assert not seen_ids & {item.item_id for item in reply.items}
    by_id = {e.item_id: e for e in reply.explanations}
    for item_id in seen_ids:
        (effect,) = [e for e in by_id[item_id].effects if e.stage == "seen_filter"]
        assert (effect.effect, effect.rank_after, effect.detail) == ("removed", -1, f"seen by user u{USER}")
    # Every unseen item passed the filter; the cap then bounds the list.
    assert reply.total_items == len(expected_ids(c, 1000, 3, filtered=True))


def test_pages_cover_the_list_without_overlap(running: Running) -> None:
    whole = running.stub.Rank(case(running.catalog, k=1000).request, timeout=5)
    assert whole.total_items == 100 - SEEN_PER_USER == len(whole.items)
    pages: list[str] = []
    for offset in range(0, whole.total_items, 25):
        reply = running.stub.Rank(case(running.catalog, k=25, offset=offset).request, timeout=5)
        assert reply.total_items == whole.total_items
        pages.extend(item.item_id for item in reply.items)
    assert pages == [item.item_id for item in whole.items]


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ({"item_embeddings": b"\0" * 100, "embedding_dim": 8}, "100 items x embedding_dim 8 need 3200"),
        ({"offset": 80}, "offset 80 is beyond the ranked list of 80 items"),
    ],
)
def test_bad_input_is_invalid_argument(running: Running, fields: dict, phrase: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Rank(case(running.catalog, k=10, **fields).request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in info.value.details()


def test_redis_down_skips_the_seen_filter_and_never_fails(running: Running) -> None:
    c = case(running.catalog, k=10, max_per_category=3)
    before = running.metric("ranking_skipped_stages_total", stage="seen_filter")
    stop(running.redis)
    try:
        for _ in range(5):
            reply = running.stub.Rank(c.request, timeout=5)
            assert list(reply.skipped_stages) == ["seen_filter"]
            assert [item.item_id for item in reply.items] == expected_ids(c, 10, 3, filtered=False)
        assert running.metric("ranking_skipped_stages_total", stage="seen_filter") == before + 5
        time.sleep(0.3)  # a few readiness rounds
        assert running.serving()
        warnings = [line for line in running.log_lines() if line.get("message") == "ranking stage skipped"]
        assert warnings and warnings[-1]["level"] == "warning" and warnings[-1]["stage"] == "seen_filter"
        assert "redis unreachable" in warnings[-1]["reason"]
    finally:
        running.redis = start_socket_redis(running.workdir, persist=False)
        running.seed()
    # Back within a few retry intervals: the filter runs again.
    deadline = time.monotonic() + 10
    while True:
        reply = running.stub.Rank(c.request, timeout=5)
        if not reply.skipped_stages:
            break
        assert time.monotonic() < deadline, "the seen filter never came back after Redis did"
        time.sleep(0.1)
    assert [item.item_id for item in reply.items] == expected_ids(c, 10, 3, filtered=True)
