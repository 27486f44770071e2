"""The Celery app of the jobs: Redis as broker and result backend, tasks acknowledged late.

At-least-once delivery with exactly-once results: a task is acknowledged only after it ran
(`task_acks_late`); a worker that dies mid-task (SIGKILL, OOM, node lost) never acknowledges
it, so Redis gives it to another worker after the visibility timeout
(JOBS_VISIBILITY_TIMEOUT_SECONDS), and the pool's own child dying requeues it at once
(`task_reject_on_worker_lost`). The second run skips the requests the first one finished:
results are written once per request id (services/jobs/store.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from services.jobs.settings import JobsSettings

TASK_NAME = "infermesh.jobs.run_chunk"


def celery_app(settings: JobsSettings) -> Celery:
    redis = settings.redis()  # credentials and TLS of the broker and the result backend too
    app = Celery(
        "infermesh-jobs",
        broker=redis.celery_url(settings.broker),
        backend=redis.celery_url(settings.result_backend),
        set_as_current=False,
    )
    broker_tls, backend_tls = redis.celery_ssl(settings.broker), redis.celery_ssl(settings.result_backend)
    if broker_tls is not None:
        app.conf.update(broker_use_ssl=broker_tls)
    if backend_tls is not None:
        app.conf.update(redis_backend_use_ssl=backend_tls)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task claimed at a time: the rest stay in the queue for other workers (and the
        # queue's length says how much work waits, for the autoscaler).
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # kombu looks for expired unacknowledged tasks every interval x throttle seconds
            # (10 x 10 by default): far slower than a short visibility timeout. A sweep is
            # one ZRANGE, so look every few seconds.
            "unacked_restore_interval": restore_interval(settings.visibility_timeout_seconds),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue,
        # A chunk's summary only; the results themselves are in the job's hash.
        result_expires=3600,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app


def restore_interval(visibility_timeout: float) -> int:
    """Seconds between sweeps for tasks past the visibility timeout: half of it, 1 to 10."""
    return int(max(1, min(10, visibility_timeout // 2)))


def enqueue(app: Celery, settings: JobsSettings, job_id: str, chunks: Iterable[int]) -> None:
    """One task per chunk, sent over one broker connection."""
    with app.producer_or_acquire() as producer:
        for chunk in chunks:
            app.send_task(TASK_NAME, args=(job_id, chunk), queue=settings.queue, producer=producer)
