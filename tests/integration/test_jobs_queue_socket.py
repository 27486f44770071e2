"""The jobs' queue on a Redis reached by a unix socket: redis-py's unix:// URL, which Celery
knows as redis+socket://, carries the tasks and the results into the URL's database."""

from __future__ import annotations

from pathlib import Path

import redis

from services.jobs.queue import celery_app, enqueue
from services.jobs.settings import JobsSettings
from tests.processes import start_socket_redis, stop


def test_tasks_and_results_go_through_a_unix_socket_redis(tmp_path: Path) -> None:
    process = start_socket_redis(tmp_path, persist=False)
    socket_path = tmp_path / "redis.sock"
    try:
        settings = JobsSettings(redis_url=f"unix://{socket_path}?db=2", queue="socket-test")
        app = celery_app(settings)
        enqueue(app, settings, "job-1", [0, 1])  # 'No such transport: unix' before
        app.backend.set("socket-test-result", "done")
        with redis.Redis(unix_socket_path=str(socket_path), db=2) as client:
            assert client.llen("socket-test") == 2
            assert client.get("socket-test-result") == b"done"
        with redis.Redis(unix_socket_path=str(socket_path), db=0) as client:
            assert client.dbsize() == 0  # the URL's database, not the default one
    finally:
        stop(process)
