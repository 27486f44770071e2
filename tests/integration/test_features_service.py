"""The features service as a process (`python -m services.features`) over gRPC, against a
redis-server of this module's own that the last test stops and starts again.

Covers both GetFeatures forms, RetrieveCandidates, and degradation: with Redis stopped the
service keeps answering (flagged degraded) from its cache and the views' defaults, health
stays SERVING, the breaker opens; once Redis is back it answers fresh again within 5 s.
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

from infermesh.workload.catalog import Catalog, generate_catalog
from infermesh.workload.seed import load_into_redis
from services.features.retrieval import CandidateIndex, exact_top
from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc
from tests.processes import ServiceProcess, running_service, start_socket_redis, stop


@dataclass
class Running:
    workdir: Path
    redis: subprocess.Popen[bytes]
    service: ServiceProcess
    stub: features_pb2_grpc.FeatureServiceStub
    catalog: Catalog

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metric(name, **labels)

    def serving(self) -> bool:
        return self.service.serving()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("features-svc")
    redis_process = start_socket_redis(workdir)
    url = f"unix://{workdir / 'redis.sock'}?db=0"
    catalog = generate_catalog(seed=5, n_users=40, n_items=2_000, n_categories=8)
    with redis.Redis.from_url(url) as client:
        load_into_redis(client, catalog, progress=False)
    CandidateIndex.build(catalog.item_vecs, catalog.item_ids).save(workdir / "index" / "items.npz")
    env = {
        "FEATURES_REDIS_URL": url,
        "FEATURES_INDEX_PATH": str(workdir / "index" / "items.npz"),
        "FEATURES_CACHE_TTL_SECONDS": "0.1",  # entries go stale fast, so reads keep reaching Redis
        "FEATURES_REDIS_TIMEOUT_SECONDS": "0.3",
        "FEATURES_BREAKER_PROBE_SECONDS": "0.2",
        "FEATURES_REFRESH_SECONDS": "0.2",
    }
    running: Running | None = None
    try:
        with running_service("features", env, workdir / "features.log") as service:
            running = Running(
                workdir, redis_process, service, features_pb2_grpc.FeatureServiceStub(service.channel), catalog
            )
            yield running
    finally:
        stop(running.redis if running is not None else redis_process)  # the last test restarts Redis


def test_view_form_returns_matrix_mask_and_freshness(running: Running) -> None:
    ids = ["i5", "i1999", "missing", "i0"]
    reply = running.stub.GetFeatures(features_pb2.GetFeaturesRequest(views=["item"], entity_ids=ids), timeout=5)
    assert (reply.features.rows, reply.features.columns, reply.features.datatype) == (4, 34, "FP32")
    assert list(reply.columns[-2:]) == ["item.category", "item.price"]
    matrix = np.frombuffer(reply.features.data, "<f4").reshape(4, 34)
    index = [5, 1999, 0]
    c = running.catalog
    assert matrix[[0, 1, 3], :32].tobytes() == c.item_vecs[index].tobytes()
    assert matrix[[0, 1, 3], 32].tolist() == c.item_category[index].astype(np.float32).tolist()
    assert (matrix[2] == 0).all()
    assert np.frombuffer(reply.present, np.uint8).tolist() == [1, 1, 0, 1]
    age = np.frombuffer(reply.freshness_seconds, "<f4")
    assert np.isinf(age[2]) and (age[[0, 1, 3]] >= 0).all() and not reply.degraded


def test_reference_form_is_what_the_gateway_forwards(running: Running) -> None:
    reply = running.stub.GetFeatures(features_pb2.GetFeaturesRequest(user_id="u3", item_ids=["i7", "i8"]), timeout=5)
    rows = np.frombuffer(reply.model_input.data, "<f4").reshape(2, 64)
    assert reply.model_input.columns == 64 and not reply.degraded
    # The layout the gateway reads the rows by: 32 user columns, then the item's.
    assert reply.user_columns == 32
    assert rows[:, :32].tobytes() == np.repeat(running.catalog.user_vecs[3][None], 2, 0).tobytes()
    assert rows[:, 32:].tobytes() == running.catalog.item_vecs[[7, 8]].tobytes()


@pytest.mark.parametrize(
    ("request_", "code", "phrase"),
    [
        (
            features_pb2.GetFeaturesRequest(views=["nope"], entity_ids=["i1"]),
            grpc.StatusCode.NOT_FOUND,
            "unknown feature view",
        ),
        (
            features_pb2.GetFeaturesRequest(views=["user", "item"], entity_ids=["i1"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "mix entity types",
        ),
        (
            features_pb2.GetFeaturesRequest(views=["item"], entity_ids=[]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "entity_ids",
        ),
        (
            features_pb2.GetFeaturesRequest(views=["item"], entity_ids=["i1"], user_id="u1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "either",
        ),
        (features_pb2.GetFeaturesRequest(user_id="u404", item_ids=["i1"]), grpc.StatusCode.NOT_FOUND, "unknown user"),
    ],
)
def test_bad_requests_get_clear_statuses(running: Running, request_, code: grpc.StatusCode, phrase: str) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        running.stub.GetFeatures(request_, timeout=5)
    assert raised.value.code() == code and phrase in raised.value.details()


def test_retrieve_candidates_matches_exact_search_on_a_small_catalog(running: Running) -> None:
    c = running.catalog
    reply = running.stub.RetrieveCandidates(features_pb2.RetrieveCandidatesRequest(user_id="u9", count=20), timeout=5)
    assert [int(i[1:]) for i in reply.item_ids] == exact_top(c.item_vecs, c.user_vecs[9], 20).tolist()
    assert len(np.frombuffer(reply.scores, "<f4")) == 20 and not reply.degraded
    for request_, code in (
        (features_pb2.RetrieveCandidatesRequest(user_id="u9", count=0), grpc.StatusCode.INVALID_ARGUMENT),
        (features_pb2.RetrieveCandidatesRequest(user_id="u404", count=5), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            running.stub.RetrieveCandidates(request_, timeout=5)
        assert raised.value.code() == code


def test_redis_outage_answers_degraded_stays_serving_and_recovers(running: Running) -> None:
    request_ = features_pb2.GetFeaturesRequest(user_id="u1", item_ids=["i1", "i2", "i3"])
    healthy = running.stub.GetFeatures(request_, timeout=5)
    assert not healthy.degraded

    stop(running.redis)
    # Past FEATURES_CACHE_TTL_SECONDS (0.1): every cached entry is stale, so no reply can be
    # a fresh cache hit (waiting on the clock, not on how fast the calls below happen).
    time.sleep(0.25)
    degraded = []
    for _ in range(10):
        started = time.monotonic()
        reply = running.stub.GetFeatures(request_, timeout=1.0)
        assert time.monotonic() - started < 1.0
        degraded.append(reply.degraded)
        assert reply.model_input.data == healthy.model_input.data  # stale cache entries, same values
        time.sleep(0.05)
    assert all(degraded)
    assert running.serving()
    assert running.metric("features_circuit_open") == 1
    assert running.metric("features_degraded_responses_total") >= 9
    # Entities never cached come back as defaults, flagged, rather than as an error.
    cold = running.stub.GetFeatures(features_pb2.GetFeaturesRequest(user_id="u2", item_ids=["i99"]), timeout=1.0)
    assert cold.degraded and cold.missing_items == 1

    running.redis = start_socket_redis(running.workdir)
    back = time.monotonic()
    while True:
        reply = running.stub.GetFeatures(request_, timeout=1.0)
        if not reply.degraded:
            break
        assert time.monotonic() - back < 5.0, "still degraded 5 s after Redis came back"
        time.sleep(0.05)
    assert reply.model_input.data == healthy.model_input.data
    assert running.metric("features_circuit_open") == 0
    assert running.serving()
