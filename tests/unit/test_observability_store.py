"""The OTLP receiver (real gRPC, fed by the real SDK exporter), the trace store and the
trace view's pages and JSON."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore, spans_from_request
from infermesh.traces.traceview import TraceView
from services.runtime.otlp_encoding import FastOTLPSpanExporter


@pytest.fixture()
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver(TraceStore()) as running:
        yield running


def _provider(endpoint: str, service: str, exporter: type[OTLPSpanExporter] = OTLPSpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter(endpoint=endpoint, insecure=True)))
    return provider


def _emit_request_trace(receiver: OtlpReceiver, exporter: type[OTLPSpanExporter] = OTLPSpanExporter) -> str:
    """gateway (server) -> features (server, via a propagated context) -> MGET; ranking error."""
    gateway = _provider(receiver.endpoint, "gateway", exporter)
    features = _provider(receiver.endpoint, "features", exporter)
    try:
        tracer = gateway.get_tracer("test")
        with tracer.start_as_current_span("Recommend", kind=SpanKind.SERVER) as root:
            with tracer.start_as_current_span("infermesh.gateway.features") as stage:
                remote = features.get_tracer("test")
                with remote.start_as_current_span("GetFeatures", kind=SpanKind.SERVER):
                    with remote.start_as_current_span(
                        "MGET",
                        kind=SpanKind.CLIENT,
                        attributes={"db.system.name": "redis", "infermesh.features.keys": 201},
                    ) as mget:
                        mget.add_event("reply", {"bytes": 27336})
            with tracer.start_as_current_span("infermesh.gateway.ranking") as failed:
                failed.set_status(Status(StatusCode.ERROR, "ranking: UNAVAILABLE"))
            assert stage.get_span_context().trace_id == root.get_span_context().trace_id
            return format(root.get_span_context().trace_id, "032x")
    finally:
        gateway.shutdown()
        features.shutdown()


# The SDK's own exporter, and the one the services use (same exporter, own encoder).
@pytest.mark.parametrize("exporter", [OTLPSpanExporter, FastOTLPSpanExporter])
def test_receiver_stores_what_the_sdk_exports(receiver: OtlpReceiver, exporter: type[OTLPSpanExporter]) -> None:
    trace_id = _emit_request_trace(receiver, exporter)
    trace = receiver.store.wait_for(trace_id, lambda t: len(t.spans) == 5, timeout=10)
    assert trace is not None and len(trace.spans) == 5
    assert trace.title == "gateway: Recommend \u2192 features: GetFeatures"
    assert trace.services == ["gateway", "features"]
    assert sorted(trace.edges()) == sorted(
        [
            (("gateway", "Recommend"), ("gateway", "infermesh.gateway.features")),
            (("gateway", "infermesh.gateway.features"), ("features", "GetFeatures")),
            (("features", "GetFeatures"), ("features", "MGET")),
            (("gateway", "Recommend"), ("gateway", "infermesh.gateway.ranking")),
        ]
    )
    names = [(depth, span.name) for depth, span in trace.walk()]
    assert names == [
        (0, "Recommend"),
        (1, "infermesh.gateway.features"),
        (2, "GetFeatures"),
        (3, "MGET"),
        (1, "infermesh.gateway.ranking"),
    ]
    (mget,) = [s for s in trace.spans if s.name == "MGET"]
    assert mget.kind == "CLIENT"
    assert mget.attributes == {"db.system.name": "redis", "infermesh.features.keys": 201}
    assert [e.name for e in mget.events] == ["reply"]
    assert trace.has_error
    (ranking,) = [s for s in trace.spans if s.name == "infermesh.gateway.ranking"]
    assert ranking.status == "ERROR" and ranking.status_message == "ranking: UNAVAILABLE"
    assert all(s.end_ns >= s.start_ns for s in trace.spans)


def _request(
    trace_id: bytes, spans: list[tuple[bytes, bytes, str, int, int]], service: str = "svc"
) -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add(
        resource=resource_pb2.Resource(
            attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))]
        )
    )
    scope = resource_spans.scope_spans.add()
    for span_id, parent, name, start, end in spans:
        scope.spans.append(
            trace_pb2.Span(
                trace_id=trace_id,
                span_id=span_id,
                parent_span_id=parent,
                name=name,
                start_time_unix_nano=start,
                end_time_unix_nano=end,
                attributes=[
                    common_pb2.KeyValue(key="n", value=common_pb2.AnyValue(int_value=3)),
                    common_pb2.KeyValue(
                        key="list",
                        value=common_pb2.AnyValue(
                            array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(bool_value=True)])
                        ),
                    ),
                ],
            )
        )
    return request


def test_spans_from_request_decodes_values() -> None:
    (span,) = spans_from_request(_request(b"\x01" * 16, [(b"\x02" * 8, b"", "root", 10, 30)]))
    assert span.trace_id == "01" * 16 and span.span_id == "02" * 8 and span.parent_span_id == ""
    assert span.service == "svc" and span.duration_ns == 20
    assert span.attributes == {"n": 3, "list": [True]}


def test_store_orders_and_evicts() -> None:
    store = TraceStore(max_traces=3)
    base = 1_700_000_000_000_000_000
    for i, duration_ms in enumerate([5, 50, 1, 20]):
        store.add_request(
            _request(
                bytes([i + 1]) * 16,
                [(b"\x01" * 8, b"", f"t{i}", base + i * 1_000_000, base + i * 1_000_000 + duration_ms * 1_000_000)],
            )
        )
    assert store.get("01" * 16) is None  # oldest evicted
    assert [t.title for t in store.recent(10)] == ["svc: t3", "svc: t2", "svc: t1"]
    assert [t.title for t in store.slowest(2)] == ["svc: t1", "svc: t3"]
    assert store.recent(10, service="other") == []


def test_orphans_and_late_parents() -> None:
    store = TraceStore()
    trace_id = b"\x07" * 16
    # A child arrives before its parent's batch (processes flush independently).
    store.add_request(_request(trace_id, [(b"\x02" * 8, b"\x01" * 8, "child", 20, 30)], "backend"))
    trace = store.get("07" * 16)
    assert trace is not None and [s.name for s in trace.roots()] == ["child"]
    store.add_request(_request(trace_id, [(b"\x01" * 8, b"", "parent", 10, 40)], "front"))
    trace = store.get("07" * 16)
    assert trace is not None and trace.title == "front: parent"
    assert trace.edges() == [(("front", "parent"), ("backend", "child"))]
    assert [depth for depth, _ in trace.walk()] == [0, 1]


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("content-type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read().decode()


def test_trace_view_pages(receiver: OtlpReceiver) -> None:
    trace_id = _emit_request_trace(receiver)
    assert receiver.store.wait_for(trace_id, lambda t: len(t.spans) == 5, timeout=10) is not None
    with TraceView(receiver.store, port=0) as view:
        status, kind, page = _get(view.url + "/")
        assert status == 200 and kind.startswith("text/html")
        assert f'href="/trace/{trace_id}"' in page and "Slowest traces" in page and "Recent traces" in page

        status, _, page = _get(view.trace_url(trace_id))
        assert status == 200
        assert page.count("<details>") == 5  # one waterfall row per span
        for name in ("Recommend", "infermesh.gateway.features", "GetFeatures", "MGET", "infermesh.gateway.ranking"):
            assert f"{name}</div>" in page
        assert "db.system.name" in page and "has errors" in page

        status, kind, body = _get(f"{view.url}/api/traces/{trace_id}")
        assert status == 200 and kind == "application/json"
        doc = json.loads(body)
        assert doc["spans"] == 5 and doc["services"] == ["gateway", "features"]
        assert [s["name"] for s in doc["span_list"]][:2] == ["Recommend", "infermesh.gateway.features"]

        status, _, body = _get(f"{view.url}/api/traces?order=slowest&limit=5")
        assert status == 200 and [t["trace_id"] for t in json.loads(body)] == [trace_id]

        status, _, page = _get(view.trace_url("0" * 32))
        assert status == 404 and 'http-equiv="refresh"' in page
        status, _, _ = _get(f"{view.url}/api/traces/{'0' * 32}")
        assert status == 404
        status, _, _ = _get(f"{view.url}/?limit=many")
        assert status == 400


def test_trace_view_escapes_span_names() -> None:
    store = TraceStore()
    store.add_request(_request(b"\x09" * 16, [(b"\x01" * 8, b"", "<script>alert(1)</script>", 1, 2)]))
    with TraceView(store, port=0) as view:
        _, _, page = _get(view.trace_url("09" * 16))
        assert "<script>alert" not in page and "&lt;script&gt;" in page
        _, _, page = _get(view.url + "/")
        assert "<script>alert" not in page


def test_exports_are_decoded_when_read_and_the_oldest_dropped_when_too_many_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from infermesh.traces import store as store_module

    decoded: list[int] = []
    real = store_module.spans_from_request

    def counting(request: trace_service_pb2.ExportTraceServiceRequest) -> list:
        decoded.append(1)
        return real(request)

    monkeypatch.setattr(store_module, "spans_from_request", counting)
    store = TraceStore(max_pending_spans=3)
    first, second, third = b"\x05" * 16, b"\x06" * 16, b"\x07" * 16
    store.add_request(_request(first, [(b"\x01" * 8, b"", "a", 1, 2), (b"\x02" * 8, b"\x01" * 8, "b", 1, 2)]))
    assert decoded == []  # nobody has looked yet: nothing decoded
    assert store.spans_received == 2 and len(decoded) == 1
    store.add_request(_request(second, [(b"\x03" * 8, b"", "c", 1, 2)] * 2))
    store.add_request(_request(third, [(b"\x04" * 8, b"", "d", 1, 2)] * 2))
    # 4 spans waiting > 3: the oldest waiting export is dropped undecoded
    assert len(decoded) == 1 and store.spans_dropped == 2
    assert store.get(second.hex()) is None
    trace = store.get(third.hex())
    assert trace is not None and len(trace.spans) == 2 and len(decoded) == 2
    assert store.get(first.hex()) is not None  # decoded before: kept
    assert TraceStore(max_traces=1000).max_pending_spans == 50_000
