"""Settings of the jobs service (JOBS_*): its gRPC server and its Celery workers read the same."""

from __future__ import annotations

from typing import Any

import grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.channels import channel_options, tls_credentials
from services.runtime.redis_connection import RedisClientSettings, RedisTarget
from services.runtime.redis_keys import DEFAULT_REDIS_URL
from services.runtime.settings import ServerSettings, listen_port
from services.runtime.topology import DEFAULT_EDGE_PORT

# Under the mesh's key root (services/runtime/redis_keys.py), beside features' and ranking's keys.
DEFAULT_NAMESPACE = "infermesh:v1:jobs"
# The Celery queue the chunks of every job go to; its length (a Redis list of this name)
# is what the Kubernetes autoscaler scales the workers on.
DEFAULT_QUEUE = "infermesh-jobs"


class JobsSettings(ServerSettings, RedisClientSettings):
    """Jobs: asynchronous and bulk Recommend requests, run by Celery workers through the edge."""

    model_config = SettingsConfigDict(env_prefix="JOBS_")

    port: int = listen_port(30500)
    redis_url: str = Field(
        DEFAULT_REDIS_URL, description="Redis holding the jobs: their requests, results and progress."
    )
    broker_url: str = Field(
        "",
        description=(
            "Celery broker (a Redis URL); empty: JOBS_REDIS_URL, the same Redis as the jobs. "
            "JOBS_REDIS_USERNAME / _PASSWORD / _TLS_* apply to it unless it carries its own user or password."
        ),
    )
    result_backend_url: str = Field(
        "", description="Celery result backend (a Redis URL); empty: the broker's URL. Credentials as the broker's."
    )
    namespace: str = Field(DEFAULT_NAMESPACE, min_length=1, description="Key prefix of the jobs in Redis.")
    queue: str = Field(DEFAULT_QUEUE, min_length=1, description="Celery queue of the jobs' chunks.")
    gateway_target: str = Field(
        f"127.0.0.1:{DEFAULT_EDGE_PORT}",
        min_length=1,
        description="Where workers send each job's Recommend calls: the edge (Envoy), host:port.",
    )
    gateway_tls: bool = Field(
        False,
        description=(
            "Workers speak TLS to JOBS_GATEWAY_TARGET (an edge that serves TLS); also on when a "
            "JOBS_GATEWAY_TLS_*_FILE is set."
        ),
    )
    gateway_tls_ca_file: str = Field(
        "", description="CA certificate(s), PEM, the edge's certificate must chain to; empty: the system's roots."
    )
    gateway_tls_cert_file: str = Field(
        "", description="Client certificate, PEM, the workers present to the edge (with the key file)."
    )
    gateway_tls_key_file: str = Field("", description="Private key, PEM, of that client certificate.")
    gateway_tls_server_name: str = Field(
        "",
        description=(
            "The name the edge's certificate must carry, when it is not JOBS_GATEWAY_TARGET's host "
            "(on Kubernetes the workers dial `envoy`, the certificate names the edge's public name)."
        ),
    )
    results_dir: str = Field(
        ".infermesh/jobs",
        min_length=1,
        description="Directory where a job's results file goes when its submitter names none; workers write it.",
    )
    chunk_size: int = Field(
        50, ge=1, le=10_000, description="Requests per Celery task: what one worker claims, and redoes if it dies."
    )
    concurrency: int = Field(
        4,
        ge=1,
        le=256,
        description="Recommend calls one worker keeps in flight: bounds the load a job puts on the mesh.",
    )
    request_timeout_seconds: float = Field(10.0, gt=0, description="Deadline of each Recommend call a worker makes.")
    max_attempts: int = Field(
        5,
        ge=1,
        le=100,
        description=(
            "Tries per request on UNAVAILABLE or RESOURCE_EXHAUSTED (with exponential back-off) before "
            "the request is recorded as failed with that status."
        ),
    )
    retry_backoff_seconds: float = Field(0.2, gt=0, description="First back-off between tries; doubles each time.")
    retry_backoff_max_seconds: float = Field(5.0, gt=0, description="Longest back-off between tries.")
    visibility_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description=(
            "A task a worker took and never acknowledged (it was killed) goes back to the queue after this "
            "long; keep it above the longest chunk takes, or chunks run twice (harmless: results are "
            "written once per request id, but the work is wasted)."
        ),
    )
    max_requests: int = Field(1_000_000, ge=1, description="Most requests one job may hold.")
    max_body_requests: int = Field(
        10_000, ge=1, description="Most requests a job submitted in one SubmitJob call (REST body) may hold."
    )
    retention_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="How long a finished or cancelled job's record stays in Redis."
    )

    @model_validator(mode="after")
    def _backoff_in_order(self) -> JobsSettings:
        if self.retry_backoff_max_seconds < self.retry_backoff_seconds:
            raise ValueError("JOBS_RETRY_BACKOFF_MAX_SECONDS must be at least JOBS_RETRY_BACKOFF_SECONDS")
        return self

    @model_validator(mode="after")
    def _gateway_tls_consistent(self) -> JobsSettings:
        self.check_paired("gateway_tls_cert_file", "gateway_tls_key_file")
        if self.gateway_tls_server_name and not self.gateway_uses_tls:
            raise ValueError(
                f"{self.variable('gateway_tls_server_name')} is set but the workers' channel is plaintext: "
                f"set {self.variable('gateway_tls')}=true or {self.variable('gateway_tls_ca_file')}"
            )
        return self

    @property
    def gateway_uses_tls(self) -> bool:
        return self.gateway_tls or bool(self.gateway_tls_ca_file or self.gateway_tls_cert_file)

    def gateway_credentials(self) -> grpc.ChannelCredentials | None:
        """The workers' channel to the edge: None for plaintext, else TLS from the files (read
        now: SettingsError naming an unreadable one)."""
        if not self.gateway_uses_tls:
            return None
        return tls_credentials(self.gateway_tls_ca_file, self.gateway_tls_cert_file, self.gateway_tls_key_file)

    def gateway_channel_options(self) -> list[tuple[str, Any]]:
        options = channel_options()
        if self.gateway_tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.gateway_tls_server_name))
        return options

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        return self.result_backend_url or self.broker

    def redis(self) -> RedisTarget:
        """The jobs' Redis with JOBS_REDIS_USERNAME, _PASSWORD and _TLS_*; SettingsError when they clash."""
        return self.redis_target(self.redis_url)
