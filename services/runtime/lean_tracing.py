"""A cheaper way to record the mesh's spans with the OpenTelemetry SDK: same spans, less CPU.

At 100% sampling every request records ~15 spans across the services, and the SDK's
Tracer.start_span + Span.end cost more CPU per span than encoding it for export: the
sampler is asked even when a parent-based sampler can only follow the sampled parent,
every attribute is validated one by one, the span is built through three constructors,
and at its end it is copied into a new ReadableSpan for the processors.

LeanTracer is the SDK's own Tracer (same provider, processors, limits, resource, ids,
self-metrics) with a fast path for a span whose parent is sampled, under a ParentBased
sampler that samples what its parent sampled (the SDK's default delegates), with scalar
attributes only (links are checked and kept as the SDK keeps them). Its sampling decision
is known without asking the sampler; it is built directly as a LeanSpan (a subclass of the
SDK's Span, so a ReadableSpan to every processor and exporter), and at its end handed to
the processors as it is: after end() nothing of it can change (the SDK refuses
attributes, status, events and links on an ended span), so the copy protects nothing
here. Anything else (a root span, another sampler, list or None attribute values, more
attributes than the limit, a length limit) takes the SDK's own path, unchanged.

It has a second fast path, for a span whose parent is valid and not sampled, under a
ParentBased sampler that drops what its parent dropped (the SDK's default delegates): the
SDK's own answer, a NonRecordingSpan with a new span id and the parent's trace id, flags and
trace state, built without asking the sampler. With tracing off or at 1% sampling nearly
every span of the mesh takes it (the trace id still reaches every log line).

Measured in a quiet loop on the development VM (python -m infermesh.bench.span_cost's
request shape): see docs/benchmarks.md, "Tracing".
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from time import time_ns
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

# Attribute values the SDK would store as they are (its validation passes them unchanged).
_SCALARS = frozenset({str, bool, int, float})
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags.SAMPLED
_RANDOM = TraceFlags.RANDOM_TRACE_ID


class LeanSpan(SdkSpan):
    """The SDK's Span, built without its constructors and handed over at its end as itself."""

    def end(self, end_time: int | None = None) -> None:
        with self._lock:
            ended = self._end_time is not None
            if not ended:
                self._end_time = end_time if end_time is not None else time_ns()
                self._attributes._immutable = True  # type: ignore[union-attr]  # the SDK's BoundedAttributes
        if ended:
            SdkSpan.end(self, end_time)  # the SDK's warning, nothing else
            return
        if self._record_end_metrics:
            self._record_end_metrics()
        processor = self._span_processor
        processor._on_ending(self)
        processor.on_end(self)


def follows_parent(sampler: object, parent_sampled: bool) -> bool:
    """True for a ParentBased sampler whose delegates for a remote and a local parent that
    was (`parent_sampled`) or was not sampled do what that parent did: sample every child
    (ALWAYS_ON), or drop every child (ALWAYS_OFF). The SDK's default delegates do both."""
    which, expected = ("sampled", ALWAYS_ON) if parent_sampled else ("not_sampled", ALWAYS_OFF)
    return (
        isinstance(sampler, ParentBased)
        and getattr(sampler, f"_remote_parent_{which}", None) is expected
        and getattr(sampler, f"_local_parent_{which}", None) is expected
    )


class LeanTracer(SdkTracer):
    """An SDK Tracer with the fast paths above; build it with lean(sdk_tracer)."""

    _lean_ok: bool
    _drops_unsampled: bool
    _max_attributes: int | None

    def start_span(
        self,
        name: str,
        context: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Any = None,
        links: Sequence[trace_api.Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        parent = trace_api.get_current_span(context).get_span_context()
        if not parent.trace_flags & _SAMPLED and parent.is_valid and self._drops_unsampled and self._is_enabled():
            # What the SDK answers (its sampler would drop it), without asking the sampler.
            self._tracer_metrics.start_span(parent, Decision.DROP)
            return NonRecordingSpan(
                SpanContext(
                    parent.trace_id,
                    self.id_generator.generate_span_id(),
                    is_remote=False,
                    trace_flags=TraceFlags(parent.trace_flags & _RANDOM),
                    trace_state=parent.trace_state,
                )
            )
        if (
            not self._lean_ok
            or not parent.trace_flags & _SAMPLED
            or not parent.is_valid
            or (attributes and not _plain(attributes, self._max_attributes))
            or not self._is_enabled()
        ):
            return super().start_span(
                name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
            )
        span_context = SpanContext(
            parent.trace_id,
            self.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(_SAMPLED | (parent.trace_flags & _RANDOM)),
            trace_state=parent.trace_state,
        )
        limits = self._span_limits
        span = LeanSpan.__new__(LeanSpan)
        span._name = name
        span._context = span_context
        span._kind = kind
        span._instrumentation_info = self.instrumentation_info
        span._instrumentation_scope = self._instrumentation_scope
        span._parent = parent
        span._end_time = None
        bounded = BoundedAttributes(limits.max_span_attributes, None, immutable=False)
        if attributes:
            bounded._dict.update(attributes)
        span._attributes = bounded
        span._events = BoundedList(limits.max_events)
        span._resource = self.resource
        span._status = _UNSET
        span._sampler = self.sampler
        span._trace_config = None
        span._record_exception = record_exception
        span._set_status_on_exception = set_status_on_exception
        span._span_processor = self.span_processor
        span._limits = limits
        # Links (a coalesced batch's span) as the SDK keeps them: checked, attributes bounded.
        span._links = span._new_links(links) if links else BoundedList(limits.max_links)
        span._lock = threading.Lock()
        span._record_end_metrics = self._tracer_metrics.start_span(parent, Decision.RECORD_AND_SAMPLE)
        span._start_time = start_time if start_time is not None else time_ns()
        self.span_processor.on_start(span, parent_context=context)
        return span


def _plain(attributes: Any, most: int | None) -> bool:
    """Scalar values only, and no more of them than the span keeps: stored as given."""
    if most is not None and len(attributes) > most:
        return False
    return all(type(value) in _SCALARS for value in attributes.values())


def lean(tracer: trace_api.Tracer) -> trace_api.Tracer:
    """The same tracer with the fast path, when it is the SDK's; any other tracer as it is."""
    if type(tracer) is not SdkTracer:
        return tracer
    fast = LeanTracer.__new__(LeanTracer)
    fast.__dict__.update(tracer.__dict__)
    limits = tracer._span_limits
    # A length limit truncates string values: the SDK's path applies it.
    fast._lean_ok = follows_parent(tracer.sampler, parent_sampled=True) and limits.max_span_attribute_length is None
    fast._drops_unsampled = follows_parent(tracer.sampler, parent_sampled=False)
    fast._max_attributes = limits.max_span_attributes
    return fast
