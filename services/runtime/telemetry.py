"""OpenTelemetry set up from the standard OTEL_* variables, plus the span helpers services use.

The variables are declared and checked in services/runtime/settings.py (TelemetrySettings):
a bad value stops the process at start with a message naming the variable.

* Export: OTLP over gRPC or HTTP/protobuf (OTEL_EXPORTER_OTLP_PROTOCOL, per signal
  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (as it is) or
  OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/HTTP appends v1/traces), through the OpenTelemetry
  exporter packages (headers, TLS, timeout, compression: their OTEL_EXPORTER_OTLP_*
  variables) behind the SDK's BatchSpanProcessor (OTEL_BSP_*). No endpoint, or
  OTEL_TRACES_EXPORTER=none: nothing exported.
* OTEL_SDK_DISABLED=true: no tracer provider at all (the API's no-op): nothing recorded or
  exported, no export thread; requests are served as ever.
* Sampling: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on:
  a request that arrives through Envoy follows Envoy's decision). When nothing is exported
  and no sampler is set, new traces are not recorded; every request still gets a trace id
  (in its log lines and its response) and a caller's sampled traceparent is honoured.
* Resource: OTEL_RESOURCE_ATTRIBUTES over the defaults (service.namespace, instance id);
  service.name from OTEL_SERVICE_NAME, else that variable's service.name, else the process.
* INFERMESH_TRACE_PIPELINE: `fast` (the default) records spans through lean_tracing's
  fast path and encodes them with otlp_encoding's writer, inside the same exporters;
  `stock` is the SDK and the exporters as they ship. Measured side by side at 100%
  sampling, fast was the clear gain (docs/benchmarks.md, "Tracing: stock or fast span pipeline").

Every custom span and attribute name used in the mesh is a constant below and is listed in
telemetry/schema.yaml (a unit test keeps the two in step). Services open spans with
`span(name, {attribute: value})`; nothing here runs at import time.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from services.runtime.lean_tracing import lean
from services.runtime.settings import TelemetrySettings, TracePipeline, TracePipelineSettings, load_settings

TRACER_NAME = "infermesh"
# Response metadata (gRPC initial metadata; Envoy's transcoder passes it on as an HTTP
# response header) carrying the request's W3C trace id.
TRACE_ID_HEADER = "x-trace-id"

# --------------------------------------------------------------------------- names
# Span names (see telemetry/schema.yaml for who emits each and its attributes).
SPAN_REDIS_MGET = "MGET"  # OpenTelemetry db convention: the operation name
SPAN_FEATURES_CACHE_LOOKUP = "infermesh.features.cache_lookup"
SPAN_SCORING_QUEUE = "infermesh.scoring.queue"
SPAN_SCORING_INFERENCE = "infermesh.scoring.inference"
SPAN_RANKING_PREFIX = "infermesh.ranking."  # + top_k (the chain), + each chain stage
SPAN_GATEWAY_FALLBACK = "infermesh.gateway.fallback"
# Cross-request coalescing (gateway/coalescing.py): a request's wait for a batched stage
# call, and the batched call itself (links between the two).
SPAN_GATEWAY_COALESCED = "infermesh.gateway.coalesced"
SPAN_GATEWAY_BATCH = "infermesh.gateway.batch"
# A job's own trace (services/jobs/tracing.py): its submission (the root), each chunk a
# worker ran, the results file, a cancellation; its requests' traces link to it.
SPAN_JOBS_SUBMIT = "infermesh.jobs.submit"
SPAN_JOBS_CHUNK = "infermesh.jobs.chunk"
SPAN_JOBS_RESULTS = "infermesh.jobs.results"
SPAN_JOBS_CANCEL = "infermesh.jobs.cancel"

# Standard attributes (OpenTelemetry semantic conventions).
ATTR_DB_SYSTEM = "db.system.name"
ATTR_DB_OPERATION = "db.operation.name"
ATTR_DB_NAMESPACE = "db.namespace"
ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
# Custom attributes, all namespaced infermesh.*.
ATTR_FEATURES_KEYS = "infermesh.features.keys"
ATTR_CACHE_HIT = "infermesh.cache.hit"
ATTR_CACHE_HITS = "infermesh.cache.hits"
ATTR_CACHE_MISSES = "infermesh.cache.misses"
ATTR_BATCH_SIZE = "infermesh.batch.size"
ATTR_BATCH_ID = "infermesh.batch.id"
ATTR_BATCH_REQUESTS = "infermesh.batch.requests"
ATTR_MODEL_NAME = "infermesh.model.name"
ATTR_MODEL_VERSION = "infermesh.model.version"
ATTR_EXECUTION_PROVIDER = "infermesh.execution_provider"
ATTR_ITEMS = "infermesh.items"
ATTR_K = "infermesh.k"
ATTR_STAGE = "infermesh.stage"
ATTR_FALLBACK_REASON = "infermesh.fallback.reason"
ATTR_DEADLINE_REMAINING_MS = "infermesh.deadline.remaining_ms"
ATTR_COALESCE_WAIT_MS = "infermesh.coalesce.wait_ms"
ATTR_JOB_ID = "infermesh.job.id"
ATTR_JOB_CHUNK = "infermesh.job.chunk"
ATTR_JOB_REQUESTS = "infermesh.job.requests"
ATTR_JOB_REQUEST_ID = "infermesh.job.request_id"

Attributes = Mapping[str, AttributeValue]


# --------------------------------------------------------------------------- setup


# The span pipeline tracer() builds on, set by setup_telemetry (INFERMESH_TRACE_PIPELINE).
_pipeline: TracePipeline = "fast"


@dataclass
class Telemetry:
    settings: TelemetrySettings
    provider: TracerProvider | None  # None: OTEL_SDK_DISABLED, the API's no-op
    exporting: bool
    pipeline: TracePipeline = "fast"

    def shutdown(self) -> None:
        """Flush what is buffered; called on graceful shutdown."""
        if self.provider is not None:
            self.provider.force_flush(timeout_millis=5_000)
            self.provider.shutdown()


def build_resource(service: str, settings: TelemetrySettings) -> Resource:
    """The process's resource: OTEL_RESOURCE_ATTRIBUTES over our defaults, and service.name
    from OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES, else `service`."""
    given = settings.resource()
    attributes = {
        "service.namespace": "infermesh",
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        **given,
        "service.name": settings.service_name or given.get("service.name") or service,
    }
    # Resource.create adds the SDK's telemetry.sdk.* attributes; ours win over its own
    # reading of the same variables.
    return Resource.create(attributes)


def build_sampler(settings: TelemetrySettings) -> Sampler:
    """OTEL_TRACES_SAMPLER(_ARG) as the spec maps them; when nothing is exported and no
    sampler is set, parentbased_always_off (nobody would receive new traces)."""
    if not settings.exporting and "traces_sampler" not in settings.model_fields_set:
        return ParentBased(ALWAYS_OFF)
    name = settings.traces_sampler
    root = name.removeprefix("parentbased_")
    if root == "always_on":
        chosen: Sampler = ALWAYS_ON
    elif root == "always_off":
        chosen = ALWAYS_OFF
    else:  # traceidratio
        chosen = TraceIdRatioBased(settings.sampler_ratio)
    return ParentBased(chosen) if name.startswith("parentbased_") else chosen


def build_exporter(settings: TelemetrySettings, pipeline: TracePipeline) -> SpanExporter:
    """The OTLP span exporter of the traces protocol, aimed at the resolved endpoint; the
    package reads the rest of its OTEL_EXPORTER_OTLP_* variables itself."""
    endpoint = settings.traces_endpoint
    if settings.traces_protocol == "http/protobuf":
        if pipeline == "fast":
            from services.runtime.otlp_encoding import FastOTLPHttpSpanExporter

            return FastOTLPHttpSpanExporter(endpoint=endpoint)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=endpoint)
    if pipeline == "fast":
        from services.runtime.otlp_encoding import FastOTLPSpanExporter

        return FastOTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint)


def setup_telemetry(service: str, environ: Mapping[str, str] | None = None) -> Telemetry:
    """Install the process's tracer provider from the OTEL_* variables (os.environ by
    default); called once by run() and the jobs worker, never at import. A bad variable
    raises SettingsError naming it, before anything is installed."""
    settings = load_settings(TelemetrySettings, environ)
    pipeline = load_settings(TracePipelineSettings, environ).trace_pipeline
    global _pipeline
    _pipeline = pipeline
    provider = None
    if not settings.sdk_disabled:
        provider = TracerProvider(sampler=build_sampler(settings), resource=build_resource(service, settings))
        if settings.exporting:
            provider.add_span_processor(BatchSpanProcessor(build_exporter(settings, pipeline)))
        trace.set_tracer_provider(provider)
    tracer.cache_clear()
    return Telemetry(settings=settings, provider=provider, exporting=settings.exporting, pipeline=pipeline)


# --------------------------------------------------------------------------- helpers


@functools.cache
def tracer() -> trace.Tracer:
    """The mesh's tracer (a proxy until setup_telemetry installs the provider): the SDK's,
    with services.runtime.lean_tracing's cheaper path for children of sampled spans when
    the pipeline is `fast`."""
    sdk_tracer = trace.get_tracer(TRACER_NAME)
    return lean(sdk_tracer) if _pipeline == "fast" else sdk_tracer


class _CurrentSpan:
    """`with`: a span started, made current for the body, ended after it. An exception
    (not a BaseException such as cancellation) is recorded on the span and sets its status
    to ERROR, then propagates, as the SDK's start_as_current_span does; a plain class
    rather than that helper's three nested generator context managers (~4 us less per span)."""

    __slots__ = ("_name", "_attributes", "_kind", "_span", "_token")

    def __init__(self, name: str, attributes: Attributes | None, kind: SpanKind) -> None:
        self._name, self._attributes, self._kind = name, attributes, kind

    def __enter__(self) -> Span:
        self._span = tracer().start_span(self._name, kind=self._kind, attributes=self._attributes)
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        current = self._span
        try:
            if isinstance(error, Exception) and current.is_recording():
                current.record_exception(error)
                current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            current.end()
        finally:
            otel_context.detach(self._token)


# child_span outside any trace: nothing started.
_NO_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)


def span(
    name: str,
    attributes: Attributes | None = None,
    /,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    **more: AttributeValue,
) -> AbstractContextManager[Span]:
    """A child span of the current one, current for the body of the `with`.

    Dotted attribute names go in the mapping (`span("MGET", {"db.system.name": "redis"})`);
    plain ones may be keywords. Exceptions are recorded on the span and re-raised.
    """
    return _CurrentSpan(name, {**attributes, **more} if more else attributes, kind)


def child_span(
    name: str,
    attributes: Attributes | None = None,
    /,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
) -> AbstractContextManager[Span]:
    """Like span(), but only inside a trace: work done outside any request (background
    refreshes, probes) starts no trace of its own."""
    if not trace.get_current_span().get_span_context().is_valid:
        return _NO_SPAN
    return _CurrentSpan(name, attributes, kind)


def stage_span(prefix: str, stage: str, attributes: Attributes | None = None) -> AbstractContextManager[Span]:
    """`span(prefix + stage)`, e.g. stage_span(SPAN_RANKING_PREFIX, "top_k")."""
    return span(prefix + stage, attributes)


def fallback_span(stage: str, reason: str) -> AbstractContextManager[Span]:
    """Wrap the code that serves a fallback: span infermesh.gateway.fallback."""
    return span(SPAN_GATEWAY_FALLBACK, {ATTR_STAGE: stage, ATTR_FALLBACK_REASON: reason})


def record_span(
    name: str,
    start_perf_ns: int,
    end_perf_ns: int,
    attributes: Attributes | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
) -> None:
    """A finished child of the current span for an interval measured with
    time.perf_counter_ns() elsewhere, e.g. the time a request waited in a batcher's queue,
    which another task measured. Costs nothing when the current span is not sampled."""
    parent = trace.get_current_span()
    if not parent.is_recording():
        return
    offset = time.time_ns() - time.perf_counter_ns()
    child = tracer().start_span(name, kind=kind, attributes=attributes, start_time=start_perf_ns + offset)
    child.end(end_time=end_perf_ns + offset)


def set_attributes(attributes: Attributes) -> None:
    """Add attributes to the current span (a no-op when it is not recording)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(attributes)


def current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def current_span_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.span_id, "016x") if context.is_valid else ""


def current_ids_if_sampled() -> tuple[str, str] | None:
    """(trace_id, span_id) of the current span when it is sampled; for metric exemplars."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid and context.trace_flags.sampled:
        return format(context.trace_id, "032x"), format(context.span_id, "016x")
    return None
