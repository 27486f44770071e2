"""Finished spans to OTLP protobuf bytes (an ExportTraceServiceRequest), written directly.

Why not the exporter package's encoder: it builds a protobuf object per span, per
attribute and per value, and groups spans by hashing their Resource (a JSON dump of its
attributes, per span). Measured on the development VM in a quiet loop, that encoding cost
more CPU per span (~33 us) than creating and ending the span (~27 us); with the same
spans traced on every request, it is most of what 100% sampling costs. Here the wire bytes
are written with a few joins, spans are grouped by resource and scope identity, and the
encoded form of an attribute is reused while the same key and value recur (span names,
rpc.*, stage names do on every request).

The output means exactly what opentelemetry.exporter.otlp.proto.common's encode_spans
produces (tests/unit/test_otlp_encoding.py parses both and compares them), field numbers
per opentelemetry/proto/trace/v1/trace.proto.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as OTLPHttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind

logger = logging.getLogger(__name__)

# Span.kind values of trace.proto (SPAN_KIND_INTERNAL = 1 ... CONSUMER = 5).
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
# SpanFlags: the parent's is_remote is known (0x100) and true (0x200).
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
# Encoded attributes kept for reuse; past this many distinct ones new ones are not kept, so
# high-cardinality values cannot grow it without bound.
_ATTRIBUTE_CACHE_LIMIT = 4096
# Only scalars are kept: equal tuples may hold values of different types ((True,) == (1,)).
_CACHED_TYPES = frozenset({str, bool, int, float})


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 values: two's complement, ten bytes
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_prefixed(payload: bytes) -> bytes:
    return _varint(len(payload)) + payload


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint_prefixed(payload)


def _string(tag: bytes, value: str | None) -> bytes:
    # proto3: an empty string is the default and is not written.
    return _field(tag, value.encode()) if value else b""


def _uint(tag: bytes, value: int | None) -> bytes:
    return tag + _varint(value) if value else b""


def _fixed64(tag: bytes, value: int | None) -> bytes:
    return tag + _FIXED64(value) if value else b""


# --------------------------------------------------------------------------- attributes
# common.proto: AnyValue {string 1, bool 2, int 3, double 4, array 5, kvlist 6, bytes 7};
# KeyValue {key 1, value 2}; ArrayValue / KeyValueList {values 1}.


def _any_value(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"cannot encode a {type(value).__name__} attribute value")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))


class _Attributes:
    """Encodes attribute maps, reusing the bytes of (key, value) pairs seen before."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, type, str | bool | int | float], bytes] = {}

    def encode(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        """Every attribute as a repeated KeyValue field with this tag."""
        if not attributes:
            return b""
        parts = []
        cache = self._cache
        for key, value in attributes.items():
            # The type is part of the key: True == 1 == 1.0 must not share bytes.
            kind = type(value)
            cache_key = (key, kind, value) if kind in _CACHED_TYPES else None
            encoded = cache.get(cache_key) if cache_key is not None else None
            if encoded is None:
                try:
                    encoded = _varint_prefixed(_key_value(key, value))
                except Exception:  # as the reference encoder: log, drop this attribute
                    logger.exception("Failed to encode key %s", key)
                    continue
                if cache_key is not None and len(cache) < _ATTRIBUTE_CACHE_LIMIT:
                    cache[cache_key] = encoded
            parts.append(tag)
            parts.append(encoded)
        return b"".join(parts)


# --------------------------------------------------------------------------- spans
# trace.proto Span: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6,
# start 7 (fixed64), end 8 (fixed64), attributes 9, dropped_attributes_count 10, events 11,
# dropped_events_count 12, links 13, dropped_links_count 14, status 15, flags 16 (fixed32).


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE
    return _FLAGS_HAS_IS_REMOTE


def _trace_state(context: SpanContext) -> str:
    state = context.trace_state
    return ",".join(f"{key}={value}" for key, value in state.items()) if state else ""


class SpanEncoder:
    """Encodes batches of finished SDK spans; one per exporter (it keeps its attribute cache)."""

    def __init__(self) -> None:
        self._attributes = _Attributes()

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The ExportTraceServiceRequest for these spans, serialized."""
        # Group by resource, then by instrumentation scope, in first-seen order. By identity:
        # a provider hands every span the same objects, and hashing a Resource is costly.
        groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
        for span in spans:
            resource = span.resource
            scope = span.instrumentation_scope
            scopes = groups.setdefault(id(resource), (resource, {}))[1]
            scopes.setdefault(id(scope), (scope, []))[1].append(self._span(span))
        attributes = self._attributes
        out = []
        for resource, scopes in groups.values():
            scope_spans = []
            for scope, encoded_spans in scopes.values():
                body = [_field(b"\x0a", self._scope(scope))]
                body.extend(b"\x12" + _varint_prefixed(encoded) for encoded in encoded_spans)
                if scope is not None:
                    body.append(_string(b"\x1a", scope.schema_url))
                scope_spans.append(_field(b"\x12", b"".join(body)))
            resource_body = attributes.encode(b"\x0a", resource.attributes)
            resource_spans = _field(b"\x0a", resource_body) + b"".join(scope_spans)
            resource_spans += _string(b"\x1a", resource.schema_url)
            out.append(_field(b"\x0a", resource_spans))
        return b"".join(out)

    def _scope(self, scope: Any) -> bytes:
        # InstrumentationScope: name 1, version 2, attributes 3.
        if scope is None:
            return b""
        return (
            _string(b"\x0a", scope.name)
            + _string(b"\x12", scope.version)
            + self._attributes.encode(b"\x1a", scope.attributes)
        )

    def _span(self, span: ReadableSpan) -> bytes:
        context: SpanContext = span.get_span_context()  # type: ignore[assignment]  # an ended span has one
        parent = span.parent
        attributes = self._attributes
        parts = [
            b"\x0a\x10",
            context.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            context.span_id.to_bytes(8, "big"),
            _string(b"\x1a", _trace_state(context)),
        ]
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts += (
            _string(b"\x2a", span.name),
            b"\x30",
            _varint(_KIND[span.kind]),
            _fixed64(b"\x39", span.start_time),
            _fixed64(b"\x41", span.end_time),
            attributes.encode(b"\x4a", span.attributes),
            _uint(b"\x50", span.dropped_attributes),
        )
        for event in span.events:
            # Event: time_unix_nano 1 (fixed64), name 2, attributes 3, dropped 4.
            body = (
                _fixed64(b"\x09", event.timestamp)
                + _string(b"\x12", event.name)
                + attributes.encode(b"\x1a", event.attributes)
                + _uint(b"\x20", event.dropped_attributes)
            )
            parts.append(_field(b"\x5a", body))
        parts.append(_uint(b"\x60", span.dropped_events))
        for link in span.links:
            # Link: trace_id 1, span_id 2, attributes 4, dropped 5, flags 6. Its trace_state
            # (3) is left out, as the reference encoder leaves it out.
            linked = link.context
            body = (
                b"\x0a\x10"
                + linked.trace_id.to_bytes(16, "big")
                + b"\x12\x08"
                + linked.span_id.to_bytes(8, "big")
                + attributes.encode(b"\x22", link.attributes)
                + _uint(b"\x28", link.dropped_attributes)
                + b"\x35"
                + _FIXED32(_flags(linked))
            )
            parts.append(_field(b"\x6a", body))
        parts.append(_uint(b"\x70", span.dropped_links))
        # Status: message 2, code 3. Always present, as the reference encoder writes it.
        status = span.status
        if status is not None:
            parts.append(
                _field(b"\x7a", _string(b"\x12", status.description) + _uint(b"\x18", status.status_code.value))
            )
        parts += (b"\x85\x01", _FIXED32(_flags(parent)))
        return b"".join(parts)


class FastOTLPSpanExporter(OTLPSpanExporter):  # OTLP/gRPC
    """The standard OTLP/gRPC span exporter (endpoint, TLS, headers, timeout, compression
    and retries from the same OTEL_EXPORTER_OTLP_* variables), encoding with SpanEncoder.

    The exporter's stub wants a request message, so the bytes are parsed back into one; in
    the protobuf runtime's C code that costs well under a microsecond per span.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = SpanEncoder()

    def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(self._encoder.encode(data))


class FastOTLPHttpSpanExporter(OTLPHttpSpanExporter):
    """The standard OTLP/HTTP (protobuf) span exporter, its request body written by
    SpanEncoder. The package's export() encodes with its own encoder inline, so this one
    repeats its steps (shut-down check, the exporter's self-metrics, the POST with the
    package's retries) around our bytes, all but its 64 MiB request cap, which a batch of
    the BatchSpanProcessor's (512 spans by default) does not come near.
    tests/unit/test_otlp_encoding.py checks that a real receiver gets the same spans."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not hasattr(self, "_client") or not hasattr(self, "_metrics"):  # another release's internals
            return super().export(spans)
        if self._shutdown:
            logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                body = self._encoder.encode(spans)
            except Exception as error:  # as the package's export: log, drop the batch
                logger.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            outcome = self._client.export(body)
            if not outcome.success:
                result.error = outcome.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
