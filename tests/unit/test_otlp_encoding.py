"""services.runtime.otlp_encoding writes what the OpenTelemetry exporter's own encoder
writes: both outputs are parsed as ExportTraceServiceRequest and compared, field by field,
for spans that use every part of the format."""

from __future__ import annotations

import logging

import pytest
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceState

from services.runtime.otlp_encoding import SpanEncoder


def _recorder(limits: SpanLimits | None = None, **resource: object) -> tuple[TracerProvider, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway", **resource}), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _assert_same_encoding(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    ours = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    reference = encode_spans(spans)
    assert ours == reference, f"ours:\n{ours}\nreference:\n{reference}"
    return ours


def test_every_value_type_kind_status_event_and_link() -> None:
    provider, memory = _recorder(**{"service.instance.id": "host:1", "replicas": 2})
    tracer = provider.get_tracer("infermesh", "1.2.3", schema_url="https://opentelemetry.io/schemas/1.26.0")
    attributes = {
        "rpc.system": "grpc",
        "infermesh.items": 200,
        "negative": -3,
        "large": 2**62,
        "ratio": 0.25,
        "flag": True,
        "off": False,
        "empty": "",
        "zero": 0,
        "names": ("a", "b"),
        "counts": [1, 2, 3],
        "weights": [0.5, 1.5],
        "flags": [True, False],
        "unicode": "r\u00e9sum\u00e9 \u2192",
    }
    remote = propagate.extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "vendor=abc,other=1"}
    )
    with tracer.start_as_current_span(
        "/infermesh.gateway.v1.GatewayService/Recommend", context=remote, kind=SpanKind.SERVER, attributes=attributes
    ) as server:
        server.add_event("budget", {"infermesh.deadline.remaining_ms": 12.5, "stage": "features"})
        server.add_event("no attributes")
        for kind in (SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER):
            with tracer.start_as_current_span(f"child {kind.name}", kind=kind):
                pass
        linked = trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_state=TraceState([("k", "v")]))
        with tracer.start_as_current_span(
            "linked", links=[Link(linked, {"why": "batch"}), Link(server.get_span_context())]
        ):
            pass
        with tracer.start_as_current_span("failed") as failed:
            failed.set_status(Status(StatusCode.ERROR, "ranking: UNAVAILABLE"))
        with tracer.start_as_current_span("ok") as ok:
            ok.set_status(Status(StatusCode.OK))
    other = provider.get_tracer("redis")  # a second instrumentation scope, no version
    with other.start_as_current_span("MGET", kind=SpanKind.CLIENT, attributes={"db.system.name": "redis"}):
        pass
    spans = list(memory.get_finished_spans())
    request = _assert_same_encoding(spans)
    assert len(request.resource_spans) == 1
    assert [len(s.spans) for s in request.resource_spans[0].scope_spans] == [len(spans) - 1, 1]


def test_equal_values_of_different_types_are_not_confused() -> None:
    # The encoder reuses the bytes of (key, value) pairs: True, 1 and 1.0 are equal in
    # Python and must still be written as bool, int and double.
    provider, memory = _recorder()
    tracer = provider.get_tracer("t")
    for value in (True, 1, 1.0, "1", False, 0, 0.0, (True,), (1,), (1.0,)):
        with tracer.start_as_current_span("s", attributes={"x": value}):
            pass
    encoder = SpanEncoder()
    spans = list(memory.get_finished_spans())
    first = ExportTraceServiceRequest.FromString(encoder.encode(spans))
    again = ExportTraceServiceRequest.FromString(encoder.encode(spans))  # from the cache
    assert first == again == encode_spans(spans)
    values = [span.attributes[0].value.WhichOneof("value") for span in first.resource_spans[0].scope_spans[0].spans]
    assert values == [
        "bool_value",
        "int_value",
        "double_value",
        "string_value",
        "bool_value",
        "int_value",
        "double_value",
        "array_value",
        "array_value",
        "array_value",
    ]
    arrays = [
        span.attributes[0].value.array_value.values[0].WhichOneof("value")
        for span in first.resource_spans[0].scope_spans[0].spans[-3:]
    ]
    assert arrays == ["bool_value", "int_value", "double_value"]


def test_dropped_counts_and_two_resources() -> None:
    limits = SpanLimits(max_span_attributes=2, max_events=1, max_links=1, max_event_attributes=1)
    provider, memory = _recorder(limits)
    with provider.get_tracer("t").start_as_current_span(
        "limited",
        attributes={"a": 1, "b": 2, "c": 3},
        links=[Link(trace.SpanContext(1, 2, False)), Link(trace.SpanContext(3, 4, False))],
    ) as span:
        span.add_event("e1", {"x": 1, "y": 2})
        span.add_event("e2")
    other, other_memory = _recorder(service="features")
    with other.get_tracer("t").start_as_current_span("GetFeatures"):
        pass
    spans = [*memory.get_finished_spans(), *other_memory.get_finished_spans()]
    request = _assert_same_encoding(spans)
    limited = request.resource_spans[0].scope_spans[0].spans[0]
    assert (limited.dropped_attributes_count, limited.dropped_events_count, limited.dropped_links_count) == (1, 1, 1)
    assert len(request.resource_spans) == 2


def test_an_unencodable_attribute_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    # The SDK refuses such values, but a hand-built ReadableSpan can carry one; the
    # reference encoder logs it and leaves the attribute out, and so does ours.
    context = trace.SpanContext(0xABC, 0xDEF, is_remote=False)
    span = ReadableSpan(
        name="odd",
        context=context,
        attributes={"good": "yes", "bad": object()},
        resource=Resource.create({}),
        start_time=1,
        end_time=2,
    )
    with caplog.at_level(logging.ERROR):
        request = _assert_same_encoding([span])
    assert [kv.key for kv in request.resource_spans[0].scope_spans[0].spans[0].attributes] == ["good"]
    assert any("bad" in record.getMessage() for record in caplog.records)
