"""A job's trace, and its requests' traces linked to it.

A job outlives the process that submitted it and runs in many worker processes, so no one
span can cover it (a span ends in the process that started it). Its trace is instead:

* `infermesh.jobs.submit`, the root (Job.trace_id), started where the job is submitted
  (the jobs service's SubmitJob, or `infermesh jobs submit`), linked to the caller's span;
  its W3C traceparent is stored with the job;
* one `infermesh.jobs.chunk` span per chunk a worker runs, a child of that root, and under
  the chunk that finishes the job `infermesh.jobs.results` (writing the results file);
  `infermesh.jobs.cancel` when it is cancelled.

Every request is a trace of its own (the worker's CLIENT span is its root; the edge, the
gateway and its stages continue it), sampled by the worker's sampler (OTEL_TRACES_SAMPLER)
like any caller's, and linked to its chunk's span; the chunk's span links back to each
sampled request (at most the SDK's link limit). The job's spans follow the submitter's
sampling decision, as children of a sampled root do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import SpanLimits
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.runtime.rpc_tracing import ATTR_RPC_STATUS_CODE, rpc_attributes
from services.runtime.telemetry import (
    ATTR_JOB_CHUNK,
    ATTR_JOB_ID,
    ATTR_JOB_REQUEST_ID,
    ATTR_JOB_REQUESTS,
    SPAN_JOBS_CANCEL,
    SPAN_JOBS_CHUNK,
    SPAN_JOBS_RESULTS,
    SPAN_JOBS_SUBMIT,
    span,
    tracer,
)

RECOMMEND = "/infermesh.gateway.v1.GatewayService/Recommend"
# The job's context is stored and read as a W3C traceparent whatever OTEL_PROPAGATORS says
# (that setting is for the wire); the requests' calls use the configured propagators.
_W3C = TraceContextTextMapPropagator()
# A new trace: no parent, whatever is current.
_ROOT = otel_context.Context()


@contextmanager
def submit_span(job_id: str, requests: int) -> Iterator[tuple[str, str]]:
    """The job's root span around storing and queuing it; yields (trace id, traceparent).
    The trace id is there even when the span is not sampled (an SDK provider is set up)."""
    caller = trace.get_current_span().get_span_context()
    root = tracer().start_span(
        SPAN_JOBS_SUBMIT,
        context=_ROOT,
        kind=SpanKind.PRODUCER,
        links=[Link(caller)] if caller.is_valid else (),
        attributes={ATTR_JOB_ID: job_id, ATTR_JOB_REQUESTS: requests},
    )
    context = root.get_span_context()
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(root))
    token = otel_context.attach(trace.set_span_in_context(root))
    try:
        yield (format(context.trace_id, "032x") if context.is_valid else ""), carrier.get("traceparent", "")
    except Exception as error:
        root.record_exception(error)
        root.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        otel_context.detach(token)
        root.end()


@contextmanager
def in_job(traceparent: str) -> Iterator[None]:
    """The job's root made the parent of the spans opened in the body (none without one:
    a job stored before it had a trace starts no trace per chunk)."""
    if not traceparent:
        token = otel_context.attach(trace.set_span_in_context(trace.INVALID_SPAN))
    else:
        token = otel_context.attach(_W3C.extract({"traceparent": traceparent}, context=_ROOT))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextmanager
def chunk_span(traceparent: str, job_id: str, chunk: int) -> Iterator[Span]:
    """One chunk's span in the job's trace, current for the body."""
    with in_job(traceparent):
        if not traceparent:
            yield trace.INVALID_SPAN
            return
        attributes: dict[str, str | int] = {ATTR_JOB_ID: job_id, ATTR_JOB_CHUNK: chunk}
        with span(SPAN_JOBS_CHUNK, attributes, kind=SpanKind.CONSUMER) as current:
            yield current


def results_span(job_id: str, requests: int) -> AbstractContextManager[Span]:
    """Writing the results file, under the chunk that finished the job."""
    return span(SPAN_JOBS_RESULTS, {ATTR_JOB_ID: job_id, ATTR_JOB_REQUESTS: requests})


def record_cancel(traceparent: str, job_id: str) -> None:
    if traceparent:
        with in_job(traceparent), span(SPAN_JOBS_CANCEL, {ATTR_JOB_ID: job_id}):
            pass


def request_span(job: SpanContext, job_id: str, request_id: str) -> tuple[Span, tuple[tuple[str, str], ...]]:
    """A request's own trace: the worker's CLIENT span (not current: nothing else runs in it
    here), linked to its chunk's span; and the metadata that carries its context."""
    attributes = {**rpc_attributes(RECOMMEND), ATTR_JOB_ID: job_id, ATTR_JOB_REQUEST_ID: request_id}
    call = tracer().start_span(
        RECOMMEND, context=_ROOT, kind=SpanKind.CLIENT, links=[Link(job)] if job.is_valid else (), attributes=attributes
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(call))
    return call, tuple(carrier.items())


def end_request_span(call: Span, code: int, details: str = "") -> None:
    """`code`: the call's grpc status number (0 OK); any other is an error, as for a client span."""
    if call.is_recording():
        call.set_attribute(ATTR_RPC_STATUS_CODE, code)
        if code:
            call.set_status(Status(StatusCode.ERROR, details))
    call.end()


def link_back(chunk: Span, requests: list[SpanContext]) -> None:
    """The chunk's span links to each of its sampled requests, up to the span's link limit."""
    if not chunk.is_recording():
        return
    room = SpanLimits().max_links or 0  # OTEL_SPAN_LINK_COUNT_LIMIT, 128 by default
    for context in requests:
        if room <= 0:
            return
        if context.is_valid and context.trace_flags.sampled:
            chunk.add_link(context)
            room -= 1
