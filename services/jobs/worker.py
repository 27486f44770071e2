"""A jobs worker: a Celery worker whose task runs one chunk of a job through the edge.

    python -m services.jobs.worker         (JOBS_* settings; `infermesh up --workers N` starts N)

Each task takes one chunk (JOBS_CHUNK_SIZE requests), skips those that already have a
result (the chunk ran before, on a worker that died), and sends the rest to the gateway
over gRPC through Envoy's edge (over TLS with JOBS_GATEWAY_TLS_*, as an edge that serves
TLS needs) with at most JOBS_CONCURRENCY calls in flight, so a job never
takes more of the mesh than that per worker. UNAVAILABLE and RESOURCE_EXHAUSTED are
retried with exponential back-off up to JOBS_MAX_ATTEMPTS tries; any other error, or the
last try's, is the request's result (its status and message), never retried further.
Results are written in small batches as calls finish, so a worker killed mid-chunk loses
at most the calls in flight, which the chunk's next run makes again.

Tracing (services/jobs/tracing.py): each chunk is a span in the job's trace; each request
a trace of its own, linked to it.

The pool is `solo` (the task runs in the worker's main process, its calls on threads):
SIGKILL takes the task with it, unacknowledged, and the broker hands it out again after
the visibility timeout; SIGTERM is Celery's warm shutdown: the running chunk finishes,
then the worker exits.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import grpc
from celery import Celery
from opentelemetry.trace import Span, SpanContext

from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.jobs import tracing as job_tracing
from services.jobs.queue import TASK_NAME, celery_app
from services.jobs.results import result_record, write_results
from services.jobs.settings import JobsSettings
from services.jobs.store import COMPLETED, FAILED, RUNNING, JobStore
from services.runtime.logs import configure_logging, get_logger
from services.runtime.metrics import Metrics
from services.runtime.settings import SettingsError, load_settings
from services.runtime.telemetry import ATTR_JOB_REQUESTS, setup_telemetry
from services.runtime.topology import JOBS

log = get_logger(__name__)

WORKER_SERVICE_NAME = "jobs-worker"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Results are written (and cancellation checked) every this many finished calls.
FLUSH_EVERY = 16

Result = tuple[str, str, bool]  # request_id, result JSON, succeeded


class ChunkRunner:
    """Runs chunks in this process; its Redis client, channel and threads are made once."""

    def __init__(self, settings: JobsSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.store = JobStore.from_url(settings.redis(), settings.namespace, settings.retention_seconds)
        metrics = metrics or Metrics(JOBS)
        # Per worker (this process's /metrics) and per job: what it ran and how it ended.
        self._requests = metrics.counter(
            "jobs_worker_requests", "Requests this worker finished, by job and outcome (succeeded, failed)",
            ["job_id", "outcome"],
        )  # fmt: skip
        self._running = metrics.gauge("jobs_worker_requests_running", "Recommend calls this worker has in flight")
        self._chunks = metrics.counter(
            "jobs_worker_chunks", "Chunks (tasks) this worker ran, by outcome (done, skipped)", ["outcome"]
        )
        self._channel = gateway_channel(settings)
        # The stored payloads are RecommendRequests serialized at submit, after validation:
        # sent as they are, not parsed and serialized again per request and per try.
        self._recommend: grpc.UnaryUnaryMultiCallable[bytes, gateway_pb2.RecommendResponse] = self._channel.unary_unary(
            job_tracing.RECOMMEND,
            request_serializer=None,
            response_deserializer=gateway_pb2.RecommendResponse.FromString,
        )
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="recommend")

    def run(self, job_id: str, chunk: int) -> dict[str, Any]:
        state = self.store.mark_started(job_id)
        if state != RUNNING:  # cancelled, finished or gone: nothing to do, acknowledge it
            self._chunks.labels("skipped").inc()
            return {"job_id": job_id, "chunk": chunk, "skipped": state or "unknown job"}
        chunk_size, trace_parent = self.store.chunk_info(job_id)
        with job_tracing.chunk_span(trace_parent, job_id, chunk) as span:
            pairs = self.store.chunk(job_id, chunk)
            missing = self.store.missing(job_id, [request_id for request_id, _ in pairs])
            base = chunk * chunk_size
            todo = [
                (base + i, rid, payload)
                for i, ((rid, payload), gone) in enumerate(zip(pairs, missing, strict=False))
                if gone
            ]
            span.set_attribute(ATTR_JOB_REQUESTS, len(todo))
            written = self._run_requests(job_id, todo, span)
            self._chunks.labels("done").inc()
            self.finalize_if_done(job_id)
        return {"job_id": job_id, "chunk": chunk, "requests": len(pairs), "ran": len(todo), "written": written}

    def _run_requests(self, job_id: str, todo: Sequence[tuple[int, str, bytes]], chunk: Span) -> int:
        """Every request of `todo` on the pool; their calls' traces link to `chunk`'s span."""
        link = chunk.get_span_context()
        futures = [self._pool.submit(self._call, job_id, link, *entry) for entry in todo]
        written, batch, calls = 0, [], []
        try:
            for future in as_completed(futures):
                result, call = future.result()
                batch.append(result)
                calls.append(call)
                if len(batch) >= FLUSH_EVERY:
                    written += self._flush(job_id, batch)
                    batch = []
                    if self.store.state(job_id) != RUNNING:  # cancelled: drop what has not started
                        break
            written += self._flush(job_id, batch)
        finally:
            for future in futures:
                future.cancel()
            job_tracing.link_back(chunk, calls)
        return written

    def _flush(self, job_id: str, batch: list[Result]) -> int:
        if not batch:
            return 0
        ok, failed, _ = self.store.write_results(job_id, batch)
        # Counted once per request id, like the results: a rerun chunk adds nothing twice.
        self._requests.labels(job_id, "succeeded").inc(ok)
        self._requests.labels(job_id, "failed").inc(failed)
        return ok + failed

    def _call(
        self, job_id: str, link: SpanContext, index: int, request_id: str, payload: bytes
    ) -> tuple[Result, SpanContext]:
        """One request, tried until it answers or fails for good, in a trace of its own (one
        span over every try) linked to the chunk's; its result record and that span's context."""
        call, metadata = job_tracing.request_span(link, job_id, request_id)
        # What the span says if the worker itself fails before an answer (a payload it cannot parse).
        code, details = grpc.StatusCode.INTERNAL, "the worker failed before the call answered"
        try:
            with self._running.track_inprogress():
                result, code, details = self._try(index, request_id, payload, metadata)
            return result, call.get_span_context()
        finally:
            job_tracing.end_request_span(call, code.value[0], details)

    def _try(
        self, index: int, request_id: str, payload: bytes, metadata: tuple[tuple[str, str], ...]
    ) -> tuple[Result, grpc.StatusCode, str]:
        delay = self.settings.retry_backoff_seconds
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                reply = self._recommend(payload, timeout=self.settings.request_timeout_seconds, metadata=metadata)
            except grpc.RpcError as error:
                code = error.code()
                if code in RETRYABLE and attempt < self.settings.max_attempts:
                    jitter = random.uniform(0.5, 1.0)  # (the module's generator is safe across threads)
                    time.sleep(min(delay, self.settings.retry_backoff_max_seconds) * jitter)
                    delay *= 2
                    continue
                details = error.details() or ""
                record = result_record(request_id, index, code.name, details)
                return (request_id, _json(record), False), code, details
            return (
                (request_id, _json(result_record(request_id, index, "OK", reply=reply)), True),
                grpc.StatusCode.OK,
                "",
            )
        raise AssertionError("unreachable: the last attempt returns")

    def finalize_if_done(self, job_id: str) -> None:
        """Every request has its result: write the results file, then mark the job completed.
        Any worker may do it (again): the file is replaced whole, the state moves once."""
        status = self.store.status(job_id)
        if status.state != RUNNING or status.done < status.total:
            return
        try:
            with job_tracing.results_span(job_id, status.total):
                count = write_results(status.results, status.results_format, self.store.iter_results(job_id))
        except OSError as error:
            self.store.finish(job_id, FAILED, RUNNING, error=f"cannot write the results to {status.results}: {error}")
            log.error("job failed", job_id=job_id, error=str(error))
            return
        if self.store.finish(job_id, COMPLETED, RUNNING) == COMPLETED:
            chunks = int(self.store.redis.hget(self.store.job_key(job_id), "chunks") or 0)
            self.store.redis.delete(*(self.store.chunk_key(job_id, n) for n in range(chunks)))
            log.info("job completed", job_id=job_id, results=status.results, written=count,
                     succeeded=status.succeeded, failed=status.failed)  # fmt: skip


def gateway_channel(settings: JobsSettings) -> grpc.Channel:
    """The channel to the edge: TLS when JOBS_GATEWAY_TLS* say so (an edge that serves TLS,
    as in production), else plaintext. The files are read once: a new CA needs a restart."""
    credentials = settings.gateway_credentials()
    if credentials is None:
        return grpc.insecure_channel(settings.gateway_target, options=settings.gateway_channel_options())
    return grpc.secure_channel(settings.gateway_target, credentials, options=settings.gateway_channel_options())


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


def build_worker(settings: JobsSettings, metrics: Metrics | None = None) -> Celery:
    """The Celery app with the chunk task bound to one ChunkRunner (made on first use)."""
    app = celery_app(settings)
    runner: list[ChunkRunner] = []

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
    def run_chunk(job_id: str, chunk: int) -> dict[str, Any]:
        if not runner:
            runner.append(ChunkRunner(settings, metrics))
        return runner[0].run(job_id, chunk)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("jobs-worker", os.environ.get("LOG_LEVEL", "INFO"))
    try:
        settings = load_settings(JobsSettings)
        # Refused credentials: one line naming the variable, before Celery retries forever.
        settings.redis().check()
        settings.gateway_credentials()  # an unreadable TLS file: one line now, not a failure per chunk
        telemetry = setup_telemetry(WORKER_SERVICE_NAME)  # OTEL_SERVICE_NAME, if set, wins
    except SettingsError as error:
        raise SystemExit(f"jobs worker: {error}") from None
    metrics = Metrics(JOBS)
    if settings.metrics_port:
        metrics.serve_http(settings.host, settings.metrics_port)
    app = build_worker(settings, metrics)
    name = os.environ.get("JOBS_WORKER_NAME") or f"jobs-{os.getpid()}@{socket.gethostname()}"
    try:
        app.worker_main(
            [
                "worker", "--pool=solo", "--queues", settings.queue, "--hostname", name,
                "--without-gossip", "--without-mingle", "--loglevel", os.environ.get("LOG_LEVEL", "INFO"),
                *(argv if argv is not None else sys.argv[1:]),
            ]
        )  # fmt: skip
    finally:
        telemetry.shutdown()  # the spans of the last chunks (a warm shutdown's included)


if __name__ == "__main__":
    main()
