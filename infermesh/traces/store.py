"""An in-memory trace store fed by OTLP export requests: what the local trace view shows
and what the tracing tests assert on.

Spans are grouped by trace id; the store keeps the newest `max_traces` traces (least
recently updated evicted first). Thread-safe: the OTLP receiver's threads add spans while
the web UI's threads read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUSES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as the plain Python value it holds."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str  # "" for a root
    name: str
    service: str  # the resource's service.name
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # UNSET, OK, ERROR
    status_message: str = ""
    scope: str = ""
    events: tuple[SpanEvent, ...] = ()
    resource: dict[str, Any] = field(default_factory=dict)
    # (trace id, span id) of each span this one links to, e.g. a coalesced request's batch.
    links: tuple[tuple[str, str], ...] = ()

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def duration_ms(self) -> float:
        return self.duration_ns / 1e6

    @property
    def label(self) -> tuple[str, str]:
        """(service, span name): how the tests and the UI name a span."""
        return self.service, self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "kind": self.kind,
            "start_unix_nano": self.start_ns,
            "end_unix_nano": self.end_ns,
            "duration_ms": round(self.duration_ms, 3),
            "attributes": self.attributes,
            "status": self.status,
            "status_message": self.status_message,
            "scope": self.scope,
            "events": [{"name": e.name, "time_unix_nano": e.time_ns, "attributes": e.attributes} for e in self.events],
            "links": [{"trace_id": t, "span_id": s} for t, s in self.links],
        }


def spans_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[SpanRecord]:
    """Every span of one OTLP ExportTraceServiceRequest."""
    records = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name") or "unknown_service")
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        service=service,
                        kind=KINDS.get(span.kind, "UNSPECIFIED"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=attributes(span.attributes),
                        status=STATUSES.get(span.status.code, "UNSET"),
                        status_message=span.status.message,
                        scope=scope,
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        events=tuple(
                            SpanEvent(e.name, e.time_unix_nano, attributes(e.attributes)) for e in span.events
                        ),
                        resource=resource,
                    )
                )
    return records


@dataclass
class Trace:
    trace_id: str
    spans: list[SpanRecord] = field(default_factory=list)
    received_at: float = 0.0  # time.time() of the newest span's arrival

    # ---- shape ------------------------------------------------------------------------
    def by_id(self) -> dict[str, SpanRecord]:
        return {s.span_id: s for s in self.spans}

    def roots(self) -> list[SpanRecord]:
        """Spans whose parent is not in the trace (normally one: the first hop's)."""
        ids = self.by_id()
        return sorted(
            (s for s in self.spans if not s.parent_span_id or s.parent_span_id not in ids),
            key=lambda s: s.start_ns,
        )

    @property
    def root(self) -> SpanRecord | None:
        roots = self.roots()
        return roots[0] if roots else None

    @property
    def start_ns(self) -> int:
        return min((s.start_ns for s in self.spans), default=0)

    @property
    def end_ns(self) -> int:
        return max((s.end_ns for s in self.spans), default=0)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    @property
    def services(self) -> list[str]:
        """Services in order of their first span."""
        seen: dict[str, None] = {}
        for span in sorted(self.spans, key=lambda s: s.start_ns):
            seen.setdefault(span.service, None)
        return list(seen)

    @property
    def has_error(self) -> bool:
        return any(s.status == "ERROR" for s in self.spans)

    @property
    def title(self) -> str:
        """The root span, and the first server span of another service behind it (for a
        trace Envoy starts: which RPC it was)."""
        root = self.root
        if root is None:
            return "(no spans)"
        text = f"{root.service}: {root.name}"
        behind = [s for s in self.spans if s.kind == "SERVER" and s.service != root.service]
        if behind:
            first = min(behind, key=lambda s: s.start_ns)
            text += f" \u2192 {first.service}: {first.name}"
        return text

    def children(self) -> dict[str, list[SpanRecord]]:
        ids = self.by_id()
        out: dict[str, list[SpanRecord]] = {}
        for span in self.spans:
            parent = span.parent_span_id if span.parent_span_id in ids else ""
            out.setdefault(parent, []).append(span)
        for group in out.values():
            group.sort(key=lambda s: (s.start_ns, s.name))
        return out

    def walk(self) -> list[tuple[int, SpanRecord]]:
        """(depth, span) in waterfall order: depth-first, siblings by start time."""
        children = self.children()
        rows: list[tuple[int, SpanRecord]] = []
        stack = [(0, s) for s in reversed(children.get("", []))]
        while stack:
            depth, span = stack.pop()
            rows.append((depth, span))
            stack.extend((depth + 1, c) for c in reversed(children.get(span.span_id, [])))
        return rows

    def edges(self) -> list[tuple[tuple[str, str], tuple[str, str]]]:
        """(parent label, child label) for every parent/child pair in the trace."""
        ids = self.by_id()
        return [(ids[s.parent_span_id].label, s.label) for s in self.spans if s.parent_span_id in ids]

    def summary(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "title": self.title,
            "start_unix_nano": self.start_ns,
            "duration_ms": round(self.duration_ms, 3),
            "spans": len(self.spans),
            "services": self.services,
            "error": self.has_error,
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "span_list": [s.to_json() for _, s in self.walk()]}


class TraceStore:
    """The newest `max_traces` traces, by trace id."""

    def __init__(
        self, max_traces: int = 2000, max_spans_per_trace: int = 2000, max_pending_spans: int | None = None
    ) -> None:
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        # Export requests are kept as parsed protobuf and turned into SpanRecords only when
        # someone reads the store: a receiver nobody is looking at costs the exporting
        # machine little more than the parse. Past max_pending_spans (default: room for
        # about twice max_traces traces of 25 spans) the oldest waiting exports are dropped
        # undecoded, as the oldest traces would be evicted anyway.
        self.max_pending_spans = max_pending_spans if max_pending_spans is not None else max(10_000, 50 * max_traces)
        self._pending: deque[tuple[trace_service_pb2.ExportTraceServiceRequest, int]] = deque()  # (export, spans)
        self._pending_spans = 0
        self._traces: OrderedDict[str, Trace] = OrderedDict()
        self._changed = threading.Condition()
        self._spans_received = 0
        self._spans_dropped = 0

    @property
    def spans_received(self) -> int:
        with self._changed:
            self._drain()
            return self._spans_received

    @property
    def spans_dropped(self) -> int:
        with self._changed:
            self._drain()
            return self._spans_dropped

    def add(self, spans: Iterable[SpanRecord]) -> int:
        with self._changed:
            added = self._add(spans)
            self._changed.notify_all()
        return added

    def _add(self, spans: Iterable[SpanRecord]) -> int:
        """Under the lock: file spans under their traces, evicting the oldest traces."""
        added = 0
        now = time.time()
        for span in spans:
            trace = self._traces.get(span.trace_id)
            if trace is None:
                trace = self._traces[span.trace_id] = Trace(span.trace_id)
            else:
                self._traces.move_to_end(span.trace_id)
            if len(trace.spans) >= self.max_spans_per_trace:
                self._spans_dropped += 1
                continue
            trace.spans.append(span)
            trace.received_at = now
            added += 1
        while len(self._traces) > self.max_traces:
            self._traces.popitem(last=False)
        self._spans_received += added
        return added

    def add_request(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Keep one OTLP export; its spans are decoded when the store is next read."""
        count = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        with self._changed:
            self._pending.append((request, count))
            self._pending_spans += count
            while self._pending_spans > self.max_pending_spans and len(self._pending) > 1:
                _, dropped = self._pending.popleft()
                self._pending_spans -= dropped
                self._spans_dropped += dropped
            self._changed.notify_all()

    def _drain(self) -> None:
        """Under the lock: decode what arrived since the last read."""
        pending, self._pending, self._pending_spans = self._pending, deque(), 0
        for request, _ in pending:
            self._add(spans_from_request(request))

    def get(self, trace_id: str) -> Trace | None:
        with self._changed:
            self._drain()
            trace = self._traces.get(trace_id.lower())
            return Trace(trace.trace_id, list(trace.spans), trace.received_at) if trace else None

    def traces(self) -> list[Trace]:
        """Snapshots, most recently updated first."""
        with self._changed:
            self._drain()
            return [Trace(t.trace_id, list(t.spans), t.received_at) for t in reversed(self._traces.values())]

    def recent(self, limit: int = 50, service: str | None = None) -> list[Trace]:
        found = [t for t in self.traces() if service is None or service in t.services]
        found.sort(key=lambda t: t.start_ns, reverse=True)
        return found[:limit]

    def slowest(self, limit: int = 20, within_s: float | None = None, service: str | None = None) -> list[Trace]:
        """The slowest traces, optionally only those started in the last `within_s` seconds."""
        cutoff = (time.time() - within_s) * 1e9 if within_s else 0
        found = [t for t in self.traces() if t.start_ns >= cutoff and (service is None or service in t.services)]
        found.sort(key=lambda t: t.duration_ms, reverse=True)
        return found[:limit]

    def wait_for(self, trace_id: str, ready: Callable[[Trace], bool], timeout: float) -> Trace | None:
        """Block until the trace satisfies `ready` (spans arrive in batches from each
        process); returns the last snapshot, ready or not, or None if none arrived."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                self._drain()
                trace = self._traces.get(trace_id)
                snapshot = Trace(trace.trace_id, list(trace.spans), trace.received_at) if trace else None
                if snapshot is not None and ready(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return snapshot
                self._changed.wait(remaining)

    def clear(self) -> None:
        with self._changed:
            self._pending, self._pending_spans = deque(), 0
            self._traces.clear()
