"""The jobs in Redis: each job's record, its requests in chunks, and its results keyed by request id.

Keys, under the namespace (JOBS_NAMESPACE) and the job id:

* `<ns>:<id>`: hash, the job's record: state, total, succeeded, failed, chunks, chunk_size,
  times, where the results go;
* `<ns>:<id>:chunk:<n>`: list, chunk n's requests as request_id, RecommendRequest bytes,
  alternating, in input order (request i of chunk n is the job's request n*chunk_size + i);
* `<ns>:<id>:results`: hash, request_id -> the request's result (JSON).

Exactly-once results: a result is written with HSETNX in the same Lua script that counts
it, so a chunk run twice (its worker was killed after writing some results, and the task
came back) neither duplicates a result nor counts one twice.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import redis

from services.jobs.inputs import JobRequest
from services.runtime.errors import FailedPrecondition, NotFound
from services.runtime.redis_connection import RedisTarget

QUEUED, RUNNING, COMPLETED, CANCELLED, FAILED = "queued", "running", "completed", "cancelled", "failed"
FINISHED = frozenset({COMPLETED, CANCELLED, FAILED})
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")

# KEYS: results hash, job hash. ARGV: request_id, result JSON, "1" if it succeeded, repeated.
# Returns {new successes, new failures, succeeded + failed after}.
_WRITE_RESULTS = """
local ok, failed = 0, 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    if ARGV[i + 2] == '1' then ok = ok + 1 else failed = failed + 1 end
  end
end
local s = redis.call('HINCRBY', KEYS[2], 'succeeded', ok)
local f = redis.call('HINCRBY', KEYS[2], 'failed', failed)
return {ok, failed, s + f}
"""
# KEYS: job hash. ARGV: now. Marks the job running on its first task (queued -> running).
_START = """
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
end
return redis.call('HGET', KEYS[1], 'state')
"""
# KEYS: job hash. ARGV: new state, now, allowed current states... Returns the state after.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
for i = 3, #ARGV do
  if state == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2])
    return ARGV[1]
  end
end
return state
"""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    total: int
    succeeded: int
    failed: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    results: str
    results_format: str
    source: str
    error: str
    trace_id: str

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def elapsed_seconds(self) -> float:
        if self.started_at is None:
            return 0.0
        return max(0.0, (self.finished_at or time.time()) - self.started_at)

    @property
    def throughput(self) -> float:
        """Requests finished per second since the job started (0 until it has)."""
        elapsed = self.elapsed_seconds
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the throughput so far; None while unknown or once finished."""
        if self.state in FINISHED:
            return 0.0 if self.state == COMPLETED else None
        rate = self.throughput
        return (self.total - self.done) / rate if rate > 0 else None

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "done": self.done,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "throughput": round(self.throughput, 2),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
        }


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """Synchronous (workers are threads and Celery tasks; the gRPC servicer calls it in a thread).

    The client decodes nothing (no decode_responses): replies are bytes, which the reads
    say with cast() where the library's return types allow str as well.
    """

    def __init__(self, client: redis.Redis, namespace: str, retention_seconds: int) -> None:
        self.redis = client
        self.namespace = namespace
        self.retention_seconds = retention_seconds
        self._write_results = client.register_script(_WRITE_RESULTS)
        self._start = client.register_script(_START)
        self._transition = client.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str | RedisTarget, namespace: str, retention_seconds: int) -> JobStore:
        target = RedisTarget.of(url)
        return cls(target.client(socket_timeout=10, health_check_interval=30), namespace, retention_seconds)

    # ---- keys ---------------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.namespace}:{job_id}"

    def chunk_key(self, job_id: str, chunk: int) -> str:
        return f"{self.namespace}:{job_id}:chunk:{chunk}"

    def results_key(self, job_id: str) -> str:
        return f"{self.namespace}:{job_id}:results"

    def active_key(self) -> str:
        """Sorted set of the jobs not yet finished (by creation time): what metrics report."""
        return f"{self.namespace}:active"

    # ---- submitting ---------------------------------------------------------------------
    def create(
        self,
        job_id: str,
        requests: Sequence[JobRequest],
        chunk_size: int,
        results: str,
        results_format: str,
        source: str,
        trace_id: str = "",
        trace_parent: str = "",
    ) -> int:
        """Store a validated job; returns its number of chunks. The record goes last, so a job
        whose storing fails half-way is never visible (its chunks expire)."""
        chunks = (len(requests) + chunk_size - 1) // chunk_size
        pipe = self.redis.pipeline(transaction=False)
        for n in range(chunks):
            key = self.chunk_key(job_id, n)
            flat: list[str | bytes] = []
            for request in requests[n * chunk_size : (n + 1) * chunk_size]:
                flat += (request.request_id, request.payload)
            pipe.rpush(key, *flat)
            pipe.expire(key, self.retention_seconds)
            if n % 200 == 199:  # bounded pipelines for big jobs
                pipe.execute()
        pipe.hset(
            self.job_key(job_id),
            mapping={
                "state": QUEUED, "total": len(requests), "succeeded": 0, "failed": 0,
                "chunks": chunks, "chunk_size": chunk_size, "created_at": repr(time.time()),
                "results": results, "results_format": results_format, "source": source,
                "trace_id": trace_id, "trace_parent": trace_parent,
            },
        )  # fmt: skip
        pipe.expire(self.job_key(job_id), self.retention_seconds)
        pipe.zadd(self.active_key(), {job_id: time.time()})
        pipe.execute()
        return chunks

    # ---- reading ------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        record = cast("dict[bytes, bytes]", self.redis.hgetall(self.job_key(job_id))) if _JOB_ID.match(job_id) else {}
        if not record:
            raise NotFound(f"no job with id {job_id[:64]!r}")
        get = {key.decode(): value.decode() for key, value in record.items()}.get
        return JobStatus(
            job_id=job_id,
            state=get("state", QUEUED),
            total=int(get("total", 0)),
            succeeded=int(get("succeeded", 0)),
            failed=int(get("failed", 0)),
            created_at=float(get("created_at", 0)),
            started_at=_float(get("started_at")),
            finished_at=_float(get("finished_at")),
            results=get("results", ""),
            results_format=get("results_format", "jsonl"),
            source=get("source", ""),
            error=get("error", ""),
            trace_id=get("trace_id", ""),
        )

    def active(self, limit: int = 1000) -> list[JobStatus]:
        """The unfinished jobs, oldest first (at most `limit`); ids whose record expired are dropped."""
        statuses = []
        for raw in cast("list[bytes]", self.redis.zrange(self.active_key(), 0, limit - 1)):
            job_id = raw.decode()
            try:
                statuses.append(self.status(job_id))
            except NotFound:
                self.redis.zrem(self.active_key(), job_id)
        return statuses

    def chunk(self, job_id: str, chunk: int) -> list[tuple[str, bytes]]:
        flat = cast("list[bytes]", self.redis.lrange(self.chunk_key(job_id, chunk), 0, -1))
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    def chunk_info(self, job_id: str) -> tuple[int, str]:
        """(chunk size, the job's W3C traceparent or "") in one round trip."""
        size, parent = cast(
            "list[bytes | None]", self.redis.hmget(self.job_key(job_id), ["chunk_size", "trace_parent"])
        )
        return int(size or 1), parent.decode() if parent else ""

    def trace_parent(self, job_id: str) -> str:
        parent = cast("bytes | None", self.redis.hget(self.job_key(job_id), "trace_parent"))
        return parent.decode() if parent else ""

    def missing(self, job_id: str, request_ids: Sequence[str]) -> list[bool]:
        """For each request id, whether it has no result yet."""
        if not request_ids:
            return []
        return [value is None for value in self.redis.hmget(self.results_key(job_id), list(request_ids))]

    def iter_results(self, job_id: str, batch: int = 1000) -> Iterator[bytes]:
        for _, value in self.redis.hscan_iter(self.results_key(job_id), count=batch):
            yield value

    # ---- progress -----------------------------------------------------------------------
    def mark_started(self, job_id: str) -> str:
        """queued -> running on the first task; returns the job's state."""
        state = self._start(keys=[self.job_key(job_id)], args=[repr(time.time())])
        return state.decode() if state else ""

    def state(self, job_id: str) -> str:
        state = cast("bytes | None", self.redis.hget(self.job_key(job_id), "state"))
        return state.decode() if state else ""

    def write_results(self, job_id: str, results: Sequence[tuple[str, str, bool]]) -> tuple[int, int, int]:
        """(request_id, result JSON, succeeded) each, written once per request id. Returns
        (new successes, new failures, requests done in all)."""
        args: list[str] = []
        for request_id, result, ok in results:
            args += (request_id, result, "1" if ok else "0")
        ok, failed, done = self._write_results(keys=[self.results_key(job_id), self.job_key(job_id)], args=args)
        return int(ok), int(failed), int(done)

    def finish(self, job_id: str, state: str, *allowed: str, error: str = "") -> str:
        """Move the job to `state` if it is in one of `allowed`; returns its state after.
        A finished job's keys expire after the retention period."""
        after = self._transition(keys=[self.job_key(job_id)], args=[state, repr(time.time()), *allowed])
        if after is None:
            raise NotFound(f"no job with id {job_id[:64]!r}")
        after = after.decode() if isinstance(after, bytes) else after
        if after == state:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self.active_key(), job_id)
            if error:
                pipe.hset(self.job_key(job_id), "error", error)
            for key in (self.job_key(job_id), self.results_key(job_id)):
                pipe.expire(key, self.retention_seconds)
            pipe.execute()
        return after

    def cancel(self, job_id: str) -> JobStatus:
        status = self.status(job_id)  # NOT_FOUND first
        after = self.finish(job_id, CANCELLED, QUEUED, RUNNING)
        if after == COMPLETED:
            raise FailedPrecondition(f"job {job_id} has already completed")
        if after == FAILED:
            raise FailedPrecondition(f"job {job_id} has already failed: {status.error}")
        return self.status(job_id)


def _float(value: str | None) -> float | None:
    return float(value) if value else None
