"""Celery's URL for the jobs' Redis: credentials added once, and redis-py's unix:// written
as Celery's redis+socket:// (tests/integration/test_jobs_queue_socket.py sends through it)."""

from __future__ import annotations

from pydantic import SecretStr

from services.runtime.redis_connection import RedisTarget


def test_a_unix_socket_url_becomes_celerys_socket_url() -> None:
    target = RedisTarget("unix:///run/redis.sock")
    assert target.celery_url("unix:///run/redis.sock?db=2") == "redis+socket:///run/redis.sock?virtual_host=2"
    assert target.celery_url("unix:///run/redis.sock") == "redis+socket:///run/redis.sock?virtual_host=0"


def test_credentials_are_added_to_socket_and_tcp_urls_that_have_none() -> None:
    target = RedisTarget("redis://h:6379/0", username="jobs", password=SecretStr("p@ss"))
    assert target.celery_url("redis://h:6379/1") == "redis://jobs:p%40ss@h:6379/1"
    assert target.celery_url("unix:///s.sock?db=1") == "redis+socket://jobs:p%40ss@/s.sock?virtual_host=1"
    assert target.celery_url("redis://own:pw@h:6379/1") == "redis://own:pw@h:6379/1"  # its own win
