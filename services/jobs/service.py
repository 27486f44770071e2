"""gRPC adapter of the jobs: JobService (SubmitJob, GetJob, CancelJob) over services/jobs/api.py.

The job store and Celery's producer are synchronous (redis-py, kombu): each call runs them
on a thread, off the event loop. A job submitted here holds its requests in the call
(JOBS_MAX_BODY_REQUESTS at most); bigger jobs go in as files (`infermesh jobs submit`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import redis
from google.protobuf import json_format
from prometheus_client.core import GaugeMetricFamily

from services.genproto.infermesh.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from services.jobs.api import Jobs
from services.jobs.settings import JobsSettings
from services.jobs.store import JobStatus
from services.runtime.errors import Unavailable
from services.runtime.metrics import Metrics
from services.runtime.settings import load_settings
from services.runtime.topology import HEALTH_SERVICE_NAMES, JOBS

_STATES = {
    "queued": jobs_pb2.JOB_STATE_QUEUED,
    "running": jobs_pb2.JOB_STATE_RUNNING,
    "completed": jobs_pb2.JOB_STATE_COMPLETED,
    "cancelled": jobs_pb2.JOB_STATE_CANCELLED,
    "failed": jobs_pb2.JOB_STATE_FAILED,
}


def job_message(status: JobStatus) -> jobs_pb2.Job:
    job = jobs_pb2.Job(
        job_id=status.job_id,
        state=_STATES.get(status.state, jobs_pb2.JOB_STATE_UNSPECIFIED),
        total=status.total,
        succeeded=status.succeeded,
        failed=status.failed,
        done=status.done,
        created_at=status.created_at,
        started_at=status.started_at or 0.0,
        finished_at=status.finished_at or 0.0,
        elapsed_seconds=status.elapsed_seconds,
        throughput=status.throughput,
        results=status.results,
        results_format=status.results_format,
        error=status.error,
        trace_id=status.trace_id,
    )
    if status.eta_seconds is not None:
        job.eta_seconds = status.eta_seconds
    return job


def _row(request: jobs_pb2.JobRequest) -> dict[str, Any]:
    # The JSON form a job file's line has: one validation path for files and calls.
    return json_format.MessageToDict(request, preserving_proto_field_name=True)


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs

    async def _run(self, function: Any, *args: Any) -> JobStatus:
        try:
            return await asyncio.to_thread(function, *args)
        except redis.RedisError as error:
            raise Unavailable(f"the jobs' Redis is unreachable: {error}") from None

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        rows = [_row(r) for r in request.requests]
        status = await self._run(self._jobs.submit_rows, rows, request.results_format or "jsonl")
        return jobs_pb2.SubmitJobResponse(job=job_message(status))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=job_message(await self._run(self._jobs.status, request.job_id)))

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        return jobs_pb2.CancelJobResponse(job=job_message(await self._run(self._jobs.cancel, request.job_id)))


class JobsCollector:
    """Read at each scrape: the queue's length (what the workers' autoscaler scales on) and,
    per job not yet finished, its requests by state (queued: not yet done, which includes
    those running; a worker's own /metrics has its running calls)."""

    def __init__(self, jobs: Jobs) -> None:
        self._jobs = jobs

    def describe(self) -> list[Any]:
        return []  # read at scrape only: registering must not touch Redis

    def collect(self) -> Any:
        queue = GaugeMetricFamily(
            "jobs_queue_length", "Chunks (Celery tasks) waiting in the jobs' queue", labels=["queue"]
        )
        requests = GaugeMetricFamily(
            "jobs_job_requests", "Requests of each unfinished job, by state (queued, succeeded, failed)",
            labels=["job_id", "state"],
        )  # fmt: skip
        try:
            queue.add_metric([self._jobs.settings.queue], self._jobs.store.redis.llen(self._jobs.settings.queue))
            for status in self._jobs.store.active():
                requests.add_metric([status.job_id, "queued"], status.total - status.done)
                requests.add_metric([status.job_id, "succeeded"], status.succeeded)
                requests.add_metric([status.job_id, "failed"], status.failed)
        except redis.RedisError:
            return  # no sample beats a wrong one; readiness says Redis is unreachable
        yield queue
        yield requests


class JobsService:
    name = JOBS
    grpc_services: tuple[str, ...] = (HEALTH_SERVICE_NAMES[JOBS],)

    def __init__(self, settings: JobsSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
        self.jobs = Jobs(settings)
        self.metrics.registry.register(JobsCollector(self.jobs))

    def register(self, server: grpc.aio.Server) -> None:
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(self.jobs), server)

    async def start(self) -> None:
        pass

    async def readiness(self) -> tuple[bool, str]:
        try:
            await asyncio.to_thread(self.jobs.store.redis.ping)
        except redis.RedisError as error:
            return False, f"redis unreachable: {error}"
        return True, "serving"

    async def close(self) -> None:
        await asyncio.to_thread(self.jobs.close)


def build() -> tuple[JobsService, JobsSettings]:
    settings = load_settings(JobsSettings)
    # Refused credentials stop the service here, before its server exists, in one line naming
    # the variable; an unreachable Redis does not (it is not ready until Redis answers).
    settings.redis().check()
    return JobsService(settings), settings
