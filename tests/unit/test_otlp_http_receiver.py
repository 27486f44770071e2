"""infermesh/traces' OTLP/HTTP receiver on a loopback port: what the OpenTelemetry
OTLP/HTTP exporter sends (plain and gzip) is decoded into the store; bodies it cannot take
get the status a collector gives them. Our fast HTTP exporter sends the same request as
the stock one."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from infermesh.traces.receiver import MAX_MESSAGE_BYTES, OtlpHttpReceiver
from infermesh.traces.store import TraceStore
from services.runtime.otlp_encoding import FastOTLPHttpSpanExporter


class RecordingStore(TraceStore):
    """A TraceStore that also keeps each request as it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ExportTraceServiceRequest] = []

    def add_request(self, request: ExportTraceServiceRequest) -> None:
        self.requests.append(request)
        super().add_request(request)


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver(RecordingStore()) as running:
        yield running


def finished_spans() -> list:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "ranking", "team": "ml"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("infermesh")
    with tracer.start_as_current_span("/infermesh.ranking.v1.RankingService/Rank", kind=SpanKind.SERVER) as server:
        server.set_attribute("infermesh.items", 200)
        with tracer.start_as_current_span("infermesh.ranking.top_k", attributes={"infermesh.k": 20}):
            pass
    return list(memory.get_finished_spans())


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_the_stock_exporter_reaches_the_receiver(receiver: OtlpHttpReceiver, compression: Compression) -> None:
    spans = finished_spans()
    exporter = OTLPSpanExporter(endpoint=receiver.traces_url, compression=compression)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    (trace,) = receiver.store.traces()
    assert sorted(s.name for s in trace.spans) == [
        "/infermesh.ranking.v1.RankingService/Rank",
        "infermesh.ranking.top_k",
    ]
    assert {s.service for s in trace.spans} == {"ranking"}
    assert trace.spans[0].resource["team"] == "ml"


def test_fast_and_stock_http_exporters_send_the_same_request(receiver: OtlpHttpReceiver) -> None:
    spans = finished_spans()
    store = receiver.store
    assert isinstance(store, RecordingStore)
    assert OTLPSpanExporter(endpoint=receiver.traces_url).export(spans) is SpanExportResult.SUCCESS
    assert FastOTLPHttpSpanExporter(endpoint=receiver.traces_url).export(spans) is SpanExportResult.SUCCESS
    stock, fast = store.requests
    assert fast == stock


def test_a_wrong_path_fails_the_export(receiver: OtlpHttpReceiver) -> None:
    # What a per-signal endpoint without its path gets: it is used as it is.
    assert OTLPSpanExporter(endpoint=receiver.endpoint, timeout=2).export(finished_spans()) is SpanExportResult.FAILURE
    assert receiver.requests_received == 0


def _post(receiver: OtlpHttpReceiver, path: str, body: bytes, **headers: str) -> int:
    request = urllib.request.Request(receiver.endpoint + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"),
    [
        ("/v1/traces", b"", {"Content-Type": "application/x-protobuf"}, 200),  # an empty export
        ("/v1/traces", b"{}", {"Content-Type": "application/json"}, 415),
        ("/v1/traces", b"\xff\xff\xff", {"Content-Type": "application/x-protobuf"}, 400),
        ("/v1/traces", b"not gzip", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400),
        ("/v1/traces", b"", {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, 400),
        ("/v1/logs", b"", {"Content-Type": "application/x-protobuf"}, 404),
        # A small body that inflates past the limit is refused, not inflated whole.
        ("/v1/traces", gzip.compress(b"\0" * (MAX_MESSAGE_BYTES + 1)),
         {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400),
    ],
)  # fmt: skip
def test_bodies_it_cannot_take(receiver: OtlpHttpReceiver, path: str, body: bytes, headers: dict, status: int) -> None:
    assert _post(receiver, path, body, **headers) == status


def test_a_chunked_body_is_read_whole(receiver: OtlpHttpReceiver) -> None:
    """Envoy's OTLP/HTTP exporter sends its request chunked, without a Content-Length."""
    import http.client

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    body = encode_spans(finished_spans()).SerializeToString()
    connection = http.client.HTTPConnection(receiver.host, receiver.port, timeout=5)
    try:
        connection.request(
            "POST", "/v1/traces", body=iter([body[:10], body[10:]]),
            headers={"Content-Type": "application/x-protobuf"}, encode_chunked=True,
        )  # fmt: skip
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert len(receiver.store.traces()) == 1
