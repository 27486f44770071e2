"""services.runtime.lean_tracing: its fast path records the same spans as the SDK's own."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.runtime.lean_tracing import LeanSpan, LeanTracer, lean
from services.runtime.otlp_encoding import SpanEncoder

SAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
UNSAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}


def provider(sampler: object = None, limits: SpanLimits | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    built = TracerProvider(
        sampler=sampler or ParentBased(TraceIdRatioBased(1.0)),  # type: ignore[arg-type]
        resource=Resource.create({"service.name": "probe"}),
        span_limits=limits,
    )
    built.add_span_processor(SimpleSpanProcessor(exporter))
    return built, exporter


def request_shaped(tracer: trace.Tracer) -> None:
    """A server span continuing a remote parent, children with attributes, a status, an
    exception event, an attribute set later, and a span with a link."""
    parent = propagate.extract(SAMPLED_PARENT)
    server = tracer.start_span(
        "/pkg.Service/Method",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": "Method"},
    )
    token = otel_context.attach(trace.set_span_in_context(server, parent))
    try:
        child = tracer.start_span("infermesh.ranking.top_k", attributes={"infermesh.k": 20, "ok": True, "x": 0.5})
        child.set_attribute("infermesh.items", 200)
        child.record_exception(ValueError("boom"))
        child.set_status(Status(StatusCode.ERROR, "ValueError: boom"))
        child.end()
        linked = tracer.start_span("infermesh.gateway.batch", links=[Link(child.get_span_context())])
        linked.end()
        queue = tracer.start_span("infermesh.scoring.queue", start_time=1_000, attributes={"infermesh.batch.id": 7})
        queue.end(end_time=2_000)
        server.set_attribute("rpc.grpc.status_code", 0)
        server.end()
    finally:
        otel_context.detach(token)


def normalized(spans: list[ReadableSpan]) -> list[dict]:
    """Each span as the OTLP message says it, span ids and times of day left out."""
    message = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    reference = encode_spans(spans)
    assert message == reference  # our encoder reads lean spans as the reference does
    out = []
    for span in message.resource_spans[0].scope_spans[0].spans:
        span.span_id = span.parent_span_id = b""
        for link in span.links:
            link.span_id = b""
        if span.name != "infermesh.scoring.queue":
            span.start_time_unix_nano = span.end_time_unix_nano = 0
        for event in span.events:
            event.time_unix_nano = 0
            event.attributes.clear()  # the stack trace differs by the line that raised
        out.append(span)
    return out


def test_the_fast_path_records_what_the_sdk_records() -> None:
    sdk_provider, sdk_spans = provider()
    lean_provider, lean_spans = provider()
    request_shaped(sdk_provider.get_tracer("infermesh"))
    tracer = lean(lean_provider.get_tracer("infermesh"))
    assert isinstance(tracer, LeanTracer)
    request_shaped(tracer)
    sdk_finished, lean_finished = sdk_spans.get_finished_spans(), lean_spans.get_finished_spans()
    assert normalized(list(lean_finished)) == normalized(list(sdk_finished))
    # The children of the sampled parent took the fast path, the one with a link too.
    assert {type(s) for s in lean_finished} == {LeanSpan}
    linked = next(s for s in lean_finished if s.name == "infermesh.gateway.batch")
    assert [link.context for link in linked.links] == [
        next(s for s in lean_finished if s.name == "infermesh.ranking.top_k").context
    ]
    # The same fields as a span the SDK built: nothing the SDK (or a processor) reads is missing.
    sdk_span = next(s for s in sdk_finished if s.name == "/pkg.Service/Method")
    lean_span = next(s for s in lean_finished if s.name == "/pkg.Service/Method")
    assert set(vars(lean_span)) >= set(vars(sdk_span))
    assert lean_span.parent is not None and lean_span.parent.is_remote
    assert lean_span.context.trace_id == sdk_span.context.trace_id
    assert lean_span.context.trace_flags.sampled and lean_span.resource is lean_provider.resource


def test_an_ended_lean_span_is_exported_once_and_cannot_change() -> None:
    built, exporter = provider()
    tracer = lean(built.get_tracer("infermesh"))
    parent = propagate.extract(SAMPLED_PARENT)
    span = tracer.start_span("child", context=parent, attributes={"a": 1})
    span.end()
    span.set_attribute("b", 2)  # refused: the span ended (the SDK logs a warning)
    span.set_status(Status(StatusCode.ERROR, "late"))
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert finished is span and dict(finished.attributes) == {"a": 1}
    assert finished.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    "case",
    ["root", "list attribute", "none attribute", "too many attributes"],
)
def test_everything_else_takes_the_sdks_own_path(case: str) -> None:
    limits = SpanLimits(max_span_attributes=2) if case == "too many attributes" else None
    built, exporter = provider(limits=limits)
    tracer = lean(built.get_tracer("infermesh"))
    context = propagate.extract(SAMPLED_PARENT)
    attributes: dict = {
        "list attribute": {"ids": ["a", "b"]},
        "none attribute": {"gone": None},
        "too many attributes": {"a": 1, "b": 2, "c": 3},
    }.get(case, {"a": 1})
    span = tracer.start_span("s", context=None if case == "root" else context, attributes=attributes)
    span.end()
    assert not isinstance(span, LeanSpan)
    (finished,) = exporter.get_finished_spans()
    if case == "list attribute":
        assert finished.attributes["ids"] == ("a", "b")  # the SDK's validation, as ever
    if case == "too many attributes":
        assert len(finished.attributes) == 2 and finished.dropped_attributes == 1


def test_only_a_parent_following_sampler_and_the_sdks_tracer_get_the_fast_path() -> None:
    assert lean(trace.NoOpTracer()).__class__ is trace.NoOpTracer
    for sampler, fast in (
        (ParentBased(TraceIdRatioBased(0.5)), True),
        (ParentBased(ALWAYS_ON, local_parent_sampled=TraceIdRatioBased(0.5)), False),
        (TraceIdRatioBased(1.0), False),
        (ALWAYS_ON, False),
    ):
        built, exporter = provider(sampler)
        tracer = lean(built.get_tracer("infermesh"))
        span = tracer.start_span("s", context=propagate.extract(SAMPLED_PARENT))
        span.end()
        assert isinstance(span, LeanSpan) is fast
    built, _ = provider(limits=SpanLimits(max_span_attribute_length=8))  # strings get cut: the SDK's path
    span = lean(built.get_tracer("infermesh")).start_span("s", context=propagate.extract(SAMPLED_PARENT))
    assert not isinstance(span, LeanSpan)


class CountingSampler(ParentBased):
    def __init__(self) -> None:
        super().__init__(TraceIdRatioBased(1.0))
        self.asked = 0

    def should_sample(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.asked += 1
        return super().should_sample(*args, **kwargs)  # type: ignore[arg-type]


def test_a_child_of_an_unsampled_parent_is_what_the_sdk_answers_without_asking_the_sampler() -> None:
    carrier = {**UNSAMPLED_PARENT, "tracestate": "vendor=abc"}
    sampler = CountingSampler()
    built, exporter = provider(sampler)
    sdk = built.get_tracer("infermesh")
    tracer = lean(sdk)
    for kind, context in ((SpanKind.SERVER, propagate.extract(carrier)), (SpanKind.INTERNAL, None)):
        if context is None:  # a local unsampled parent: the server span made current
            context = trace.set_span_in_context(tracer.start_span("server", context=propagate.extract(carrier)))
        asked = sampler.asked
        ours = tracer.start_span("s", context=context, kind=kind, attributes={"a": 1})
        assert sampler.asked == asked  # the fast path
        theirs = sdk.start_span("s", context=context, kind=kind, attributes={"a": 1})
        assert sampler.asked == asked + 1
        assert type(ours) is type(theirs) is trace.NonRecordingSpan and not ours.is_recording()
        parent = trace.get_current_span(context).get_span_context()
        got, want = ours.get_span_context(), theirs.get_span_context()
        assert (got.trace_id, got.trace_flags, got.trace_state, got.is_remote) == (
            want.trace_id,
            want.trace_flags,
            want.trace_state,
            want.is_remote,
        )
        assert got.trace_id == parent.trace_id and got.span_id not in (parent.span_id, want.span_id)
        assert got.trace_state.get("vendor") == "abc" and not got.is_remote
        ours.end()
    assert exporter.get_finished_spans() == ()


def test_a_sampler_that_samples_children_of_unsampled_parents_is_asked() -> None:
    built, exporter = provider(ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON))
    span = lean(built.get_tracer("infermesh")).start_span("s", context=propagate.extract(UNSAMPLED_PARENT))
    span.end()
    assert len(exporter.get_finished_spans()) == 1
