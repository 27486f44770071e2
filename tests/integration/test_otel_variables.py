"""The standard OpenTelemetry variables, each checked by what a real collector receives.

A ranking replica (`python -m services.ranking`, its seen sets in a redis-server of this
module's own) runs with one setting at a time and exports to two real receivers at once:
infermesh/traces' OTLP/gRPC receiver and its OTLP/HTTP one. It is stopped (gracefully, so
its batch processor flushes) before the receivers are read, so "nothing arrived" means
nothing was sent, not "not yet".
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.envoy import bootstrap
from infermesh.envoy.tracing import tracing_from_env
from infermesh.traces.receiver import OtlpHttpReceiver, OtlpReceiver
from infermesh.traces.store import SpanRecord, TraceStore
from infermesh.up.supervisor import free_port
from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from services.runtime.topology import HEALTH_SERVICE_NAMES
from tests.integration.envoy_harness import all_healthy, read_back_ports, start_envoy, topology_of, until
from tests.processes import running_service, start_service, start_socket_redis, stop, wait_until_serving

RANK = "/infermesh.ranking.v1.RankingService/Rank"
REQUESTS = 5
# A caller's W3C trace context, sampled (flags 01) or not (00).
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
NOT_SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("otel-redis")
    process = start_socket_redis(workdir, persist=False)
    try:
        yield f"unix://{workdir / 'redis.sock'}?db=0"
    finally:
        stop(process)


@dataclass
class Receivers:
    grpc: OtlpReceiver
    http: OtlpHttpReceiver

    def grpc_spans(self) -> list[SpanRecord]:
        return [span for trace in self.grpc.store.traces() for span in trace.spans]

    def http_spans(self) -> list[SpanRecord]:
        return [span for trace in self.http.store.traces() for span in trace.spans]


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    with OtlpReceiver(TraceStore()) as grpc_receiver, OtlpHttpReceiver(TraceStore()) as http_receiver:
        yield Receivers(grpc_receiver, http_receiver)


def rank_request() -> ranking_pb2.RankRequest:
    items = 40
    return ranking_pb2.RankRequest(
        item_ids=[f"i{n}" for n in range(items)],
        scores=np.linspace(0.0, 1.0, items, dtype="<f4").tobytes(),
        item_categories=(np.arange(items, dtype="<i4") % 4).tobytes(),
        k=10,
        user_id="u1",  # seen_filter asks this module's Redis
    )


def clean_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` over the shell's OTEL_* variables, each emptied (empty is unset) unless given."""
    emptied = {name: "" for name in os.environ if name.startswith(("OTEL_", "INFERMESH_TRACE"))}
    return {**emptied, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "100", **env}


def serve_and_call(workdir: Path, redis_url: str, env: Mapping[str, str], traceparent: str | None = None) -> list[str]:
    """A ranking replica with `env`: REQUESTS Rank calls (each answered in full), then a
    graceful stop. Returns the x-trace-id of each response."""
    metadata = (("traceparent", traceparent),) if traceparent else None
    trace_ids = []
    service_env = {"RANKING_REDIS_URL": redis_url, "RANKING_GRACE_SECONDS": "2", **clean_environment(env)}
    with running_service("ranking", service_env, workdir / "ranking.log") as service:
        stub = ranking_pb2_grpc.RankingServiceStub(service.channel)
        for _ in range(REQUESTS):
            reply, call = stub.Rank.with_call(rank_request(), metadata=metadata, timeout=10)
            assert len(reply.items) == 10  # served, whatever the telemetry settings
            trailing = dict(call.trailing_metadata() or ())
            trace_ids.append(str(trailing.get("x-trace-id", "")))
    return trace_ids


def server_spans(spans: list[SpanRecord]) -> list[SpanRecord]:
    return [span for span in spans if span.name == RANK and span.kind == "SERVER"]


# ---------------------------------------------------------------------------- protocol


def test_grpc_protocol_reaches_the_grpc_receiver_only(tmp_path: Path, redis_url: str, receivers: Receivers) -> None:
    trace_ids = serve_and_call(
        tmp_path,
        redis_url,
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint},
    )
    received = server_spans(receivers.grpc_spans())
    assert sorted(span.trace_id for span in received) == sorted(trace_ids)
    assert receivers.http_spans() == [] and receivers.http.requests_received == 0


def test_http_protobuf_appends_v1_traces_to_the_generic_endpoint(
    tmp_path: Path, redis_url: str, receivers: Receivers
) -> None:
    # The receiver answers only at /v1/traces: the generic endpoint is a base URL.
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.http.endpoint + "/"}
    trace_ids = serve_and_call(tmp_path, redis_url, env)
    received = server_spans(receivers.http_spans())
    assert sorted(span.trace_id for span in received) == sorted(trace_ids)
    assert all(span.service == "ranking" for span in received)
    assert receivers.grpc_spans() == []


def test_per_signal_protocol_and_endpoint_win_and_the_endpoint_is_used_as_is(tmp_path: Path, redis_url: str) -> None:
    # Generic settings point at gRPC; the traces ones at an HTTP receiver on a path of its
    # own, which only the URL as given (nothing appended) reaches.
    with OtlpReceiver(TraceStore()) as grpc_receiver, OtlpHttpReceiver(TraceStore(), path="/ingest/spans") as http:
        env = {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": http.traces_url,
        }
        trace_ids = serve_and_call(tmp_path, redis_url, env)
        received = [span for trace in http.store.traces() for span in trace.spans]
        assert sorted(span.trace_id for span in server_spans(received)) == sorted(trace_ids)
        assert grpc_receiver.store.traces() == []


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_fast_pipeline_sends_the_same_spans(
    tmp_path: Path, redis_url: str, receivers: Receivers, protocol: str
) -> None:
    receiver = receivers.grpc if protocol == "grpc" else receivers.http
    base = {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    serve_and_call(tmp_path, redis_url, {**base, "INFERMESH_TRACE_PIPELINE": "stock"})
    stock = {trace.trace_id: trace for trace in receiver.store.traces()}
    receiver.store.clear()
    serve_and_call(tmp_path, redis_url, {**base, "INFERMESH_TRACE_PIPELINE": "fast"})
    fast = {trace.trace_id: trace for trace in receiver.store.traces()}
    assert len(stock) == len(fast) == REQUESTS

    def shape(traces: dict) -> set[tuple]:
        return {
            tuple(sorted((span.name, span.kind, tuple(sorted(span.attributes))) for span in trace.spans))
            for trace in traces.values()
        }

    assert shape(stock) == shape(fast)  # the same spans with the same attribute names


# ---------------------------------------------------------------------------- SDK off


def test_sdk_disabled_exports_nothing_and_requests_still_succeed(
    tmp_path: Path, redis_url: str, receivers: Receivers
) -> None:
    env = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint}
    trace_ids = serve_and_call(tmp_path, redis_url, env)  # every call answered in full
    assert receivers.grpc_spans() == []
    assert trace_ids == [""] * REQUESTS  # no SDK: no trace is started
    # A caller's trace context still passes through (the API's no-op keeps the parent).
    assert serve_and_call(tmp_path, redis_url, env, traceparent=SAMPLED) == [CALLER_TRACE] * REQUESTS
    assert receivers.grpc_spans() == []


# ---------------------------------------------------------------------------- resource


def test_resource_attributes_are_merged_and_otel_service_name_wins(
    tmp_path: Path, redis_url: str, receivers: Receivers
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint,
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=staging,service.name=ignored,"
        "service.namespace=shop,team=ml%20platform",
        "OTEL_SERVICE_NAME": "ranking-canary",
    }
    serve_and_call(tmp_path, redis_url, env)
    received = server_spans(receivers.grpc_spans())
    assert len(received) == REQUESTS
    resource = received[0].resource
    assert resource["service.name"] == "ranking-canary"
    assert resource["deployment.environment.name"] == "staging"
    assert resource["service.namespace"] == "shop"  # the variable wins over our default
    assert resource["team"] == "ml platform"  # percent-decoded
    assert resource["telemetry.sdk.language"] == "python"


def test_service_name_from_resource_attributes_without_otel_service_name(
    tmp_path: Path, redis_url: str, receivers: Receivers
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint, "OTEL_RESOURCE_ATTRIBUTES": "service.name=rank-b"}
    serve_and_call(tmp_path, redis_url, env)
    assert {span.service for span in receivers.grpc_spans()} == {"rank-b"}


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "sampler",
    [
        {"OTEL_TRACES_SAMPLER": "always_off"},
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    ],
    ids=["always_off", "traceidratio-0"],
)
def test_samplers_that_keep_nothing_send_nothing(
    tmp_path: Path, redis_url: str, receivers: Receivers, sampler: dict[str, str]
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint, **sampler}
    # Not parent-based: even a caller's sampled trace is not recorded.
    serve_and_call(tmp_path, redis_url, env)
    serve_and_call(tmp_path, redis_url, env, traceparent=SAMPLED)
    assert receivers.grpc_spans() == []


def test_parentbased_sampler_follows_the_incoming_traceparent(
    tmp_path: Path, redis_url: str, receivers: Receivers
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",  # no new traces of its own
    }
    serve_and_call(tmp_path, redis_url, env)  # no caller context: ratio 0, nothing
    serve_and_call(tmp_path, redis_url, env, traceparent=NOT_SAMPLED)  # the caller said no
    assert receivers.grpc_spans() == []
    serve_and_call(tmp_path, redis_url, env, traceparent=SAMPLED)  # the caller said yes
    received = server_spans(receivers.grpc_spans())
    assert len(received) == REQUESTS
    assert {(span.trace_id, span.parent_span_id) for span in received} == {(CALLER_TRACE, CALLER_SPAN)}


def test_parentbased_always_on_drops_what_the_caller_did_not_sample(
    tmp_path: Path, redis_url: str, receivers: Receivers
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receivers.grpc.endpoint, "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    serve_and_call(tmp_path, redis_url, env, traceparent=NOT_SAMPLED)
    assert receivers.grpc_spans() == []
    serve_and_call(tmp_path, redis_url, env)  # its own traces: every one
    assert len(server_spans(receivers.grpc_spans())) == REQUESTS


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "OTLP/JSON is not supported"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp", "Input should be 'grpc' or 'http/protobuf'"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "Input should be 'always_on'"),
        ("OTEL_TRACES_SAMPLER_ARG", "2", "Input should be less than or equal to 1"),
        ("OTEL_SDK_DISABLED", "1", "must be true or false"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team", "expected key=value pairs"),
    ],
)
def test_a_bad_variable_stops_the_service_at_start_naming_it(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    log = tmp_path / "ranking.log"
    env = {
        **os.environ,
        **clean_environment({variable: value}),
        "RANKING_PORT": str(free_port()),
        "RANKING_REDIS_URL": "",
    }
    process = start_service("services.ranking", env, log)
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop(process)
        raise AssertionError(f"ranking started with {variable}={value!r}") from None
    output = log.read_text()
    assert returncode != 0
    assert f"ranking: {variable}={value!r}: {message}" in output, output


# ---------------------------------------------------------------------------- Envoy too


@contextmanager
def ranking_on(port: int, env: Mapping[str, str], log: Path) -> Iterator[None]:
    """A ranking replica on `port` (Envoy's config names it), SERVING before it is yielded."""
    process = start_service("services.ranking", env, log)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES["ranking"])
            wait_until_serving(
                process, lambda: health.Check(check, timeout=2).status == health_pb2.HealthCheckResponse.SERVING, log
            )
        yield
    finally:
        stop(process)


async def test_envoy_and_the_service_export_one_trace_over_otlp_http(tmp_path: Path, redis_url: str) -> None:
    """`infermesh up` gives Envoy the tracer its services' variables describe: over
    http/protobuf, Envoy's spans and the replica's reach the same OTLP/HTTP receiver, in
    one trace."""
    with OtlpHttpReceiver(TraceStore()) as receiver:
        env = clean_environment(
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        )
        tracing = tracing_from_env(env)
        assert tracing is not None and tracing.otlp_endpoint == receiver.traces_url
        port = free_port()
        service_env = {**os.environ, "RANKING_REDIS_URL": redis_url, "RANKING_PORT": str(port), **env}
        with ranking_on(port, service_env, tmp_path / "ranking.log"):
            # Envoy's edge and other listeners need their clusters: nothing listens there.
            replicas = [("ranking", port), *((name, free_port()) for name in ("gateway", "features", "scoring"))]
            config = bootstrap.write(topology_of(replicas), tmp_path / "envoy.json", tracing)
            envoy = start_envoy(config, tmp_path)
            try:
                await until("admin and listeners", envoy, lambda: read_back_ports(envoy))
                await until("ranking healthy", envoy, lambda: all_healthy(envoy, [("ranking", port)]))
                with grpc.insecure_channel(envoy.address("ranking")) as channel:
                    stub = ranking_pb2_grpc.RankingServiceStub(channel)
                    _, call = stub.Rank.with_call(rank_request(), timeout=10)
                trace_id = str(dict(call.trailing_metadata() or ())["x-trace-id"])
                trace = receiver.store.wait_for(
                    trace_id, lambda t: {"envoy", "ranking"} <= set(t.services) and len(t.roots()) == 1, timeout=15
                )
            finally:
                envoy.stop()
    assert trace is not None, [t.services for t in receiver.store.traces()]
    assert {"envoy", "ranking"} <= set(trace.services), (trace.services, (tmp_path / "envoy.log").read_text()[-3000:])
    (root,) = trace.roots()
    assert root.service == "envoy"
