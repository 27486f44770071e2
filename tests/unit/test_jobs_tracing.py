"""A job's trace (services/jobs/tracing.py): the root at submit, chunks as its children,
each request a trace of its own linked to its chunk and back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

from services.jobs import tracing as job_tracing
from services.runtime import telemetry


def _install(monkeypatch: pytest.MonkeyPatch, sampler: object = None) -> InMemorySpanExporter:
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(telemetry, "tracer", lambda: tracer)
    monkeypatch.setattr(job_tracing, "tracer", lambda: tracer)
    return memory


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    yield _install(monkeypatch)


def test_a_jobs_chunks_are_children_of_its_root_and_its_requests_link_both_ways(memory: InMemorySpanExporter) -> None:
    with telemetry.span("/infermesh.jobs.v1.JobService/SubmitJob") as caller:
        with job_tracing.submit_span("j1", 3) as (trace_id, traceparent):
            pass
    assert len(trace_id) == 32 and traceparent.startswith(f"00-{trace_id}-")
    with job_tracing.chunk_span(traceparent, "j1", 0) as chunk:
        calls = [job_tracing.request_span(chunk.get_span_context(), "j1", f"r{n}") for n in range(3)]
        for call, metadata in calls:
            assert dict(metadata)["traceparent"].split("-")[1] == format(call.get_span_context().trace_id, "032x")
            job_tracing.end_request_span(call, 0)
        job_tracing.link_back(chunk, [call.get_span_context() for call, _ in calls])
        with job_tracing.results_span("j1", 3):
            pass
    job_tracing.record_cancel(traceparent, "j1")

    spans = {s.name: s for s in memory.get_finished_spans()}
    root, chunk_span = spans["infermesh.jobs.submit"], spans["infermesh.jobs.chunk"]
    assert root.parent is None and format(root.context.trace_id, "032x") == trace_id
    assert [link.context for link in root.links] == [caller.get_span_context()]
    assert root.kind == trace.SpanKind.PRODUCER and root.attributes["infermesh.job.requests"] == 3
    for child in (chunk_span, spans["infermesh.jobs.cancel"]):
        assert child.context.trace_id == root.context.trace_id and child.parent.span_id == root.context.span_id
    assert spans["infermesh.jobs.results"].parent.span_id == chunk_span.context.span_id
    requests = [s for s in memory.get_finished_spans() if s.name == job_tracing.RECOMMEND]
    assert len(requests) == 3
    for request in requests:
        assert request.parent is None and request.context.trace_id != root.context.trace_id
        assert [link.context for link in request.links] == [chunk_span.context]
        assert request.attributes["rpc.grpc.status_code"] == 0 and request.attributes["infermesh.job.id"] == "j1"
    assert {link.context.span_id for link in chunk_span.links} == {r.context.span_id for r in requests}


def test_unsampled_jobs_still_have_a_trace_id_and_no_links_to_unsampled_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memory = _install(monkeypatch, ParentBased(ALWAYS_OFF))
    with job_tracing.submit_span("j2", 1) as (trace_id, traceparent):
        pass
    assert len(trace_id) == 32 and not int(traceparent.rsplit("-", 1)[1], 16) & 1  # not sampled
    with job_tracing.chunk_span(traceparent, "j2", 0) as chunk:
        call, _ = job_tracing.request_span(chunk.get_span_context(), "j2", "r0")
        job_tracing.end_request_span(call, 14, "UNAVAILABLE")
        job_tracing.link_back(chunk, [call.get_span_context()])
    assert memory.get_finished_spans() == ()


def test_a_job_stored_without_a_trace_starts_none(memory: InMemorySpanExporter) -> None:
    with job_tracing.chunk_span("", "old", 0) as chunk:
        assert not chunk.get_span_context().is_valid
        with telemetry.child_span("anything"):
            pass
    job_tracing.record_cancel("", "old")
    assert memory.get_finished_spans() == ()


def test_an_error_while_submitting_ends_the_root_as_an_error(memory: InMemorySpanExporter) -> None:
    with pytest.raises(RuntimeError), job_tracing.submit_span("j3", 1):
        raise RuntimeError("broker down")
    (root,) = memory.get_finished_spans()
    assert root.status.status_code == trace.StatusCode.ERROR and "broker down" in root.status.description
