"""The ranking service as a process (`python -m services.ranking`) over gRPC, reading the
seen-items sets `infermesh seed` writes from a redis-server of this module's own, which
the last test stops and starts again: with Redis down ranking still answers, without the
seen filter, reported in skipped_stages, counted, logged, and health stays SERVING.

RankBatch answers each of its requests byte for byte as Rank does alone, a bad one failing
alone with Rank's status; its spans reach an OTLP receiver of the module's own.
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

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore
from infermesh.workload.catalog import Catalog, generate_catalog, seen_items
from infermesh.workload.seed import load_into_redis
from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from services.ranking.rank import RankInput, top_k
from tests.processes import ServiceProcess, running_service, start_socket_redis, stop

NAMESPACE = "test:ranking-svc"
SEEN_PER_USER = 20
MAX_BATCH = 8
BATCH_METHOD = "/infermesh.ranking.v1.RankingService/RankBatch"


@dataclass
class Running:
    workdir: Path
    redis: subprocess.Popen[bytes]
    redis_url: str
    service: ServiceProcess
    stub: ranking_pb2_grpc.RankingServiceStub
    catalog: Catalog
    traces: TraceStore

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
        "RANKING_MAX_BATCH_REQUESTS": str(MAX_BATCH),
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    running: Running | None = None
    traces = TraceStore()
    try:
        with (
            OtlpReceiver(traces) as receiver,
            running_service(
                "ranking", {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}, workdir / "ranking.log"
            ) as service,
        ):
            stub = ranking_pb2_grpc.RankingServiceStub(service.channel)
            running = Running(workdir, redis_process, url, service, stub, catalog, traces)
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


def alone(running: Running, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResult:
    """Rank's answer to the request, in the shape of a batch result."""
    try:
        return ranking_pb2.RankResult(response=running.stub.Rank(request, timeout=5), status={})
    except grpc.RpcError as error:
        return ranking_pb2.RankResult(status={"code": error.code().value[0], "message": error.details()})


def rank_batch(running: Running, requests: list[ranking_pb2.RankRequest], **kwargs) -> list[ranking_pb2.RankResult]:
    reply = running.stub.RankBatch(ranking_pb2.RankBatchRequest(requests=requests), timeout=5, **kwargs)
    assert len(reply.results) == len(requests)
    return list(reply.results)


def smembers_calls(running: Running) -> int:
    with redis.Redis.from_url(running.redis_url) as client:
        return client.info("commandstats").get("cmdstat_smembers", {}).get("calls", 0)


def test_rank_batch_answers_each_request_as_rank_does_alone(running: Running) -> None:
    c = running.catalog
    short_scores = case(c, k=10).request
    short_scores.scores = short_scores.scores[:8]
    other_user = case(c, k=7, max_per_category=2, explain=True).request
    other_user.user_id = "u5"
    requests = [
        case(c, k=10, max_per_category=3, explain=True).request,  # u3: its seen items filtered
        case(c, k=25, offset=25).request,
        other_user,
        short_scores,  # 2 scores for 100 items: INVALID_ARGUMENT, alone
        case(c, k=10, offset=80).request,  # beyond the 80 unseen items: INVALID_ARGUMENT, alone
        ranking_pb2.RankRequest(item_ids=["i1", "i2"], scores=b"\0" * 8, item_categories=b"\0" * 8, k=1),  # no user
    ]
    before = smembers_calls(running)
    results = rank_batch(running, requests)
    # One seen-set read per user (u3, u5) for the whole batch, pipelined in one round trip.
    assert smembers_calls(running) - before == 2
    assert [r.status.code for r in results] == [0, 0, 0, 3, 3, 0]
    assert results[3].status.message == "scores has 8 bytes; 100 items need 400 (<f4 each)"
    assert [i.item_id for i in results[0].response.items] == expected_ids(case(c), 10, 3, filtered=True)
    for request, result in zip(requests, results, strict=False):
        assert result.SerializeToString() == alone(running, request).SerializeToString()


def test_an_oversized_rank_batch_is_rejected_whole(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        rank_batch(running, [case(running.catalog, k=5).request] * (MAX_BATCH + 1))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == f"at most {MAX_BATCH} requests per RankBatch call, got {MAX_BATCH + 1}"
    # Recorded all the same: 9 requests, in the (8, 16] bucket.
    assert (
        running.metric("ranking_batch_requests_bucket", le="16.0")
        - running.metric("ranking_batch_requests_bucket", le="8.0")
        == 1
    )


def test_the_rank_batch_span_carries_the_number_of_requests(running: Running) -> None:
    trace_id = "6" * 32
    rank_batch(
        running, [case(running.catalog, k=5).request] * 2, metadata=[("traceparent", f"00-{trace_id}-{'c' * 16}-01")]
    )

    def has_server_span(trace) -> bool:
        return any(span.name == BATCH_METHOD for span in trace.spans)

    trace = running.traces.wait_for(trace_id, has_server_span, timeout=10)
    assert trace is not None and has_server_span(trace), "no RankBatch span arrived"
    (span,) = [span for span in trace.spans if span.name == BATCH_METHOD]
    assert span.attributes["infermesh.batch.requests"] == 2


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
        for result in rank_batch(running, [c.request, c.request]):  # as Rank: ranked, the filter skipped
            assert list(result.response.skipped_stages) == ["seen_filter"]
            assert [item.item_id for item in result.response.items] == expected_ids(c, 10, 3, filtered=False)
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
