"""GetFeaturesBatch on the features service as a process (`python -m services.features`),
against a redis-server of this module's own (stopped by the last test) and an OTLP receiver.

Each request of a batch is answered byte for byte as GetFeatures answers it alone, a bad
one fails alone with the status GetFeatures gives it, and the batch reads the union of
its keys in one Redis round trip, each key once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore
from infermesh.workload.catalog import generate_catalog
from infermesh.workload.seed import load_into_redis
from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc
from tests.processes import ServiceProcess, running_service, start_socket_redis, stop

MAX_ITEMS = 50
MAX_BATCH = 8
BATCH_METHOD = "/infermesh.features.v1.FeatureService/GetFeaturesBatch"


@dataclass
class Running:
    workdir: Path
    redis: subprocess.Popen[bytes]
    admin: redis.Redis  # connected once: a new connection's own HELLO would count below
    service: ServiceProcess
    stub: features_pb2_grpc.FeatureServiceStub
    traces: TraceStore

    def commands(self) -> dict[str, int]:
        """Calls per Redis command so far, INFO itself left out."""
        stats = self.admin.info("commandstats")
        return {name: s["calls"] for name, s in stats.items() if name != "cmdstat_info"}

    def metric(self, name: str, **labels: str) -> float:
        return self.service.metric(name, **labels)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    workdir = tmp_path_factory.mktemp("features-batch")
    redis_process = start_socket_redis(workdir, persist=False)
    url = f"unix://{workdir / 'redis.sock'}?db=0"
    with redis.Redis.from_url(url) as client:
        load_into_redis(client, generate_catalog(seed=7, n_users=30, n_items=600, n_categories=6), progress=False)
    traces = TraceStore()
    env = {
        "FEATURES_REDIS_URL": url,
        "FEATURES_INDEX_PATH": str(workdir / "no-index.npz"),
        "FEATURES_MAX_ITEMS": str(MAX_ITEMS),
        "FEATURES_MAX_BATCH_REQUESTS": str(MAX_BATCH),
        # Long-lived cache entries and no pointer refresh during the tests: every Redis
        # command counted below is a read made by the request under test.
        "FEATURES_CACHE_TTL_SECONDS": "600",
        "FEATURES_REFRESH_SECONDS": "3600",
        "FEATURES_REDIS_TIMEOUT_SECONDS": "0.3",
        "FEATURES_BREAKER_PROBE_SECONDS": "0.2",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    admin = redis.Redis.from_url(url)
    with OtlpReceiver(traces) as receiver:
        try:
            with running_service("features", {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
                                 workdir / "features.log") as service:  # fmt: skip
                stub = features_pb2_grpc.FeatureServiceStub(service.channel)
                yield Running(workdir, redis_process, admin, service, stub, traces)
        finally:
            admin.close()
            stop(redis_process)  # the last test stops it


def reference(user_id: str, item_ids: list[str]) -> features_pb2.GetFeaturesRequest:
    return features_pb2.GetFeaturesRequest(user_id=user_id, item_ids=item_ids)


def alone(running: Running, request: features_pb2.GetFeaturesRequest) -> features_pb2.GetFeaturesResult:
    """GetFeatures' answer to the request, in the shape of a batch result."""
    try:
        return features_pb2.GetFeaturesResult(features=running.stub.GetFeatures(request, timeout=5), status={})
    except grpc.RpcError as error:
        return features_pb2.GetFeaturesResult(status={"code": error.code().value[0], "message": error.details()})


def batch(running: Running, requests: list[features_pb2.GetFeaturesRequest], **kwargs) -> list:
    reply = running.stub.GetFeaturesBatch(features_pb2.GetFeaturesBatchRequest(requests=requests), timeout=5, **kwargs)
    assert len(reply.results) == len(requests)
    return list(reply.results)


def test_a_batch_is_one_round_trip_for_the_union_and_byte_identical_to_one_by_one(running: Running) -> None:
    requests = [
        reference("u1", ["i1", "i2", "i3", "i4"]),
        reference("u2", ["i3", "i4", "i5"]),  # overlaps the first
        reference("u1", ["i100", "i101"]),  # disjoint, same user as the first
        reference("u3", ["i7", "i7", "i8", "i1"]),  # a duplicate within, one across
        reference("u4", ["i9", "no-such-item"]),
    ]
    distinct_keys = 4 + 11  # users u1..u4; items i1..i5, i7..i9, i100, i101, no-such-item
    before, lookups = running.commands(), redis_lookups(running)
    results = batch(running, requests)
    after = running.commands()
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {"cmdstat_mget": 1}
    assert redis_lookups(running) - lookups == distinct_keys  # each key read once
    for request, result in zip(requests, results, strict=False):
        assert result.status.code == 0 and result.features.model_input.rows == len(request.item_ids)
        # One by one after the batch: the local cache answers them with the same values.
        assert result.SerializeToString() == alone(running, request).SerializeToString()


def redis_lookups(running: Running) -> float:
    return running.metric("features_cache_lookups_total", tier="redis")


@pytest.mark.parametrize(
    ("bad", "code", "message"),
    [
        (reference("u404", ["i1"]), grpc.StatusCode.NOT_FOUND, "unknown user 'u404'"),
        (reference("", ["i1"]), grpc.StatusCode.INVALID_ARGUMENT, "user_id is required"),
        (reference("u1", ["i1", ""]), grpc.StatusCode.INVALID_ARGUMENT, "item_ids[1] is empty; every item needs an id"),
        (
            reference("u1", [f"i{n}" for n in range(MAX_ITEMS + 1)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"at most {MAX_ITEMS} item_ids per request, got {MAX_ITEMS + 1}",
        ),
    ],
)
def test_a_bad_request_fails_alone_with_the_status_get_features_gives_it(
    running: Running, bad: features_pb2.GetFeaturesRequest, code: grpc.StatusCode, message: str
) -> None:
    good = [reference("u5", ["i20", "i21"]), reference("u6", ["i21", "i22"])]
    results = batch(running, [good[0], bad, good[1]])
    assert (results[1].status.code, results[1].status.message) == (code.value[0], message)
    assert not results[1].HasField("features")
    for request, result in zip([good[0], bad, good[1]], results, strict=False):
        assert result.SerializeToString() == alone(running, request).SerializeToString()


def test_a_view_form_entry_fails_alone(running: Running) -> None:
    view = features_pb2.GetFeaturesRequest(views=["item"], entity_ids=["i1"])
    good = reference("u1", ["i1"])
    results = batch(running, [view, good])
    assert results[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "reference form only" in results[0].status.message
    assert results[1].SerializeToString() == alone(running, good).SerializeToString()


def test_an_oversized_batch_is_rejected_whole_and_sizes_are_recorded(running: Running) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        batch(running, [reference("u1", ["i1"])] * (MAX_BATCH + 1))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == f"at most {MAX_BATCH} requests per GetFeaturesBatch call, got {MAX_BATCH + 1}"
    assert batch(running, []) == []

    # Every call is recorded, the rejected one too: its 9 requests land in the (8, 16] bucket.
    def bucket(le: str) -> float:
        return running.metric("features_batch_requests_bucket", le=le)

    assert bucket("16.0") - bucket("8.0") == 1 and bucket("1.0") >= 1  # the empty batch
    assert running.metric("features_batch_requests_count") >= 2


def test_the_call_span_carries_the_number_of_requests(running: Running) -> None:
    trace_id = "5" * 32
    batch(running, [reference("u1", ["i1"]), reference("u2", ["i2"]), reference("u3", ["i3"])],
          metadata=[("traceparent", f"00-{trace_id}-{'b' * 16}-01")])  # fmt: skip

    def has_server_span(trace) -> bool:
        return any(span.name == BATCH_METHOD for span in trace.spans)

    trace = running.traces.wait_for(trace_id, has_server_span, timeout=10)
    assert trace is not None and has_server_span(trace), "no GetFeaturesBatch span arrived"
    (span,) = [span for span in trace.spans if span.name == BATCH_METHOD]
    assert span.attributes["infermesh.batch.requests"] == 3


def test_redis_down_degrades_each_request_as_get_features_does(running: Running) -> None:
    warm = reference("u8", ["i30", "i31"])
    cold = reference("u8", ["i32"])
    assert alone(running, warm).status.code == 0  # now in the local cache, fresh for 600 s
    running.admin.close()
    stop(running.redis)
    results = batch(running, [warm, cold])
    assert [r.status.code for r in results] == [0, 0]
    assert not results[0].features.degraded  # served from fresh cache entries
    assert results[1].features.degraded and results[1].features.missing_items == 1  # the view's defaults
    for request, result in zip([warm, cold], results, strict=False):
        assert result.SerializeToString() == alone(running, request).SerializeToString()
