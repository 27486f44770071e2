"""Submitting, reading and cancelling jobs: what the JobService servicer and `infermesh jobs` call."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from services.jobs import tracing as job_tracing
from services.jobs.inputs import FORMATS, JobRequest, format_of, read_file, validate
from services.jobs.queue import celery_app, enqueue
from services.jobs.settings import JobsSettings
from services.jobs.store import FAILED, QUEUED, JobStatus, JobStore, new_job_id
from services.runtime.errors import InvalidArgument, Unavailable
from services.runtime.logs import get_logger

log = get_logger(__name__)


class Jobs:
    def __init__(self, settings: JobsSettings, store: JobStore | None = None, app: Celery | None = None) -> None:
        self.settings = settings
        self.store = store or JobStore.from_url(settings.redis(), settings.namespace, settings.retention_seconds)
        self.app = app or celery_app(settings)

    def submit_file(self, path: str | Path, results: str = "") -> JobStatus:
        """Validate the whole file (JSON Lines or Parquet), then store and queue it."""
        requests = read_file(path, self.settings.max_requests)
        return self.submit(requests, results, source=str(Path(path).resolve()))

    def submit_rows(self, rows: Iterable[Any], results_format: str = "jsonl") -> JobStatus:
        """Requests as dicts (a SubmitJob call's), validated whole, then stored and queued.
        Their results go to the results directory: a remote caller names no path."""
        if results_format not in FORMATS:
            raise InvalidArgument(f"results_format must be one of {', '.join(FORMATS)}, not {results_format!r}")
        requests = validate(rows, self.settings.max_body_requests, "request", first=0)
        name = f"results.{results_format}"
        return self.submit(requests, name, source="request body", in_results_dir=True)

    def submit(
        self,
        requests: Sequence[JobRequest],
        results: str = "",
        source: str = "",
        in_results_dir: bool = False,
    ) -> JobStatus:
        """Store and queue validated requests. `results`: the results file (its suffix gives
        the format), or with `in_results_dir` a file name under <results dir>/<job id>/;
        empty: <results dir>/<job id>/results.jsonl."""
        job_id = new_job_id()
        if not results or in_results_dir:
            results = str(Path(self.settings.results_dir).resolve() / job_id / (results or "results.jsonl"))
        results_format = format_of(results)
        # The job's trace starts here: its root's context goes with the job for the chunks.
        with job_tracing.submit_span(job_id, len(requests)) as (trace_id, trace_parent):
            try:
                chunks = self.store.create(
                    job_id, requests, self.settings.chunk_size, results, results_format, source, trace_id, trace_parent
                )
            except redis.RedisError as error:
                raise Unavailable(f"cannot store the job: {error}") from None
            try:
                enqueue(self.app, self.settings, job_id, range(chunks))
            except Exception as error:  # noqa: BLE001 (kombu/redis: the broker is unreachable)
                self.store.finish(job_id, FAILED, QUEUED, error=f"could not queue the job: {error}")
                raise Unavailable(f"job {job_id}: could not queue it ({error})") from None
        log.info("job submitted", job_id=job_id, requests=len(requests), chunks=chunks, results=results)
        return self.store.status(job_id)

    def status(self, job_id: str) -> JobStatus:
        return self.store.status(job_id)

    def cancel(self, job_id: str) -> JobStatus:
        status = self.store.cancel(job_id)
        job_tracing.record_cancel(self.store.trace_parent(job_id), job_id)
        log.info("job cancelled", job_id=job_id, done=status.done, total=status.total)
        return status

    def close(self) -> None:
        self.store.redis.close()
