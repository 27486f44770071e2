"""Typed clients over the generated stubs.

Defaults a caller should not have to think about: a deadline on every call (each call may
set its own), retries on UNAVAILABLE (the call never reached a handler, so retrying is
safe) through the gRPC service config, bounded (at most 5 attempts, gRPC's own cap) with
exponential back-off, for the idempotent calls only (Recommend, GetJob, CancelJob; never
SubmitJob), and round-robin over several edge addresses with failover: a dead edge is
skipped by the load-balancing policy and a call that hit it is retried on another.
TLS, a client certificate and an API key or bearer token: infermesh/client/security.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from infermesh.client.security import Security, security
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.genproto.infermesh.jobs.v1 import jobs_pb2, jobs_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 2.0
# gRPC caps a retry policy's attempts at 5; more would be silently cut.
MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    category: int


@dataclass(frozen=True)
class Recommendation:
    items: tuple[RecommendedItem, ...]
    model_name: str
    model_version: str
    trace_id: str
    stage_ms: dict[str, float]
    unknown_items: int


@dataclass(frozen=True)
class Job:
    """A job's progress (JobService): state is queued, running, completed, cancelled or failed."""

    job_id: str
    state: str
    total: int
    succeeded: int
    failed: int
    done: int
    elapsed_seconds: float
    throughput: float
    eta_seconds: float | None
    results: str
    results_format: str
    error: str
    trace_id: str

    @property
    def finished(self) -> bool:
        return self.state in ("completed", "cancelled", "failed")


class ClientError(Exception):
    """A failed call: `code` is the gRPC status, `message` what the mesh said."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def service_config(max_attempts: int = 3) -> dict[str, Any]:
    method: dict[str, Any] = {
        "name": [
            {"service": "infermesh.gateway.v1.GatewayService"},
            # Reads and a cancel (idempotent); SubmitJob is not retried: it stores a job.
            {"service": "infermesh.jobs.v1.JobService", "method": "GetJob"},
            {"service": "infermesh.jobs.v1.JobService", "method": "CancelJob"},
        ],
    }
    if max_attempts > 1:  # gRPC rejects a policy of one attempt: no policy is no retry
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.02s",
            "maxBackoff": "0.5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]}


def target_for(addresses: Sequence[str]) -> str:
    """One gRPC target naming every edge, so the channel balances and fails over among them."""
    if not addresses:
        raise ValueError("give at least one edge address, e.g. 127.0.0.1:8080")
    if len(addresses) == 1:
        return addresses[0]
    return "ipv4:" + ",".join(addresses)


def channel_options(max_attempts: int) -> list[tuple[str, Any]]:
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        raise ValueError(f"max_attempts must be 1 to {MAX_ATTEMPTS}, got {max_attempts}")
    return [
        ("grpc.service_config", json.dumps(service_config(max_attempts))),
        ("grpc.enable_retries", 1),
        # Re-resolve quickly after an edge goes away so round-robin sees it come back.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def _channel(module: Any, addresses: Sequence[str], secured: Security, max_attempts: int) -> Any:
    """A channel of `module` (grpc or grpc.aio): secure when `secured` has credentials."""
    target, options = target_for(addresses), channel_options(max_attempts)
    if secured.credentials is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, secured.credentials, options=options)


def _request(user_id: str, candidate_ids: Sequence[str], k: int | None) -> gateway_pb2.RecommendRequest:
    request = gateway_pb2.RecommendRequest(user_id=user_id, candidate_ids=list(candidate_ids))
    if k is not None:
        request.k = k
    return request


def _result(reply: gateway_pb2.RecommendResponse) -> Recommendation:
    return Recommendation(
        items=tuple(RecommendedItem(i.item_id, i.score, i.category) for i in reply.items),
        model_name=reply.model_name,
        model_version=reply.model_version,
        trace_id=reply.trace_id,
        stage_ms={t.stage: t.milliseconds for t in reply.stage_timings},
        unknown_items=reply.unknown_items,
    )


def _job_requests(requests: Sequence[Mapping[str, Any]], results_format: str) -> jobs_pb2.SubmitJobRequest:
    """Requests as a job file's lines are (request_id optional, RecommendRequest's JSON fields)."""
    message = jobs_pb2.SubmitJobRequest(results_format=results_format)
    try:
        json_format.ParseDict({"requests": list(requests)}, message)
    except json_format.ParseError as error:
        raise ValueError(f"not a job's requests: {error}") from None
    return message


def _job(reply: jobs_pb2.Job) -> Job:
    return Job(
        job_id=reply.job_id,
        state=jobs_pb2.JobState.Name(reply.state).removeprefix("JOB_STATE_").lower(),
        total=reply.total,
        succeeded=reply.succeeded,
        failed=reply.failed,
        done=reply.done,
        elapsed_seconds=reply.elapsed_seconds,
        throughput=reply.throughput,
        eta_seconds=reply.eta_seconds if reply.HasField("eta_seconds") else None,
        results=reply.results,
        results_format=reply.results_format,
        error=reply.error,
        trace_id=reply.trace_id,
    )


class _Client:
    """What both clients share: one channel for the client's lifetime, with its security."""

    _grpc: Any  # grpc or grpc.aio: the module the channel comes from

    def __init__(
        self,
        addresses: Sequence[str] = ("127.0.0.1:8080",),
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_attempts: int = 3,
        tls: bool | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        api_key: str | None = None,
        token: str | None = None,
    ) -> None:
        """TLS, certificates, API key and token: the arguments given, else INFERMESH_TLS,
        INFERMESH_TLS_CA_FILE, INFERMESH_TLS_CERT_FILE, INFERMESH_TLS_KEY_FILE,
        INFERMESH_API_KEY, INFERMESH_TOKEN. Raises ValueError on a contradiction."""
        self.timeout = timeout
        secured = security(
            addresses, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file, api_key=api_key, token=token
        )
        self._security = secured  # its repr leaves out the key or token
        self._channel = _channel(self._grpc, addresses, secured, max_attempts)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class MeshClient(_Client):
    """Blocking client; one channel for the client's lifetime."""

    _grpc = grpc

    def submit_job(
        self, requests: Sequence[Mapping[str, Any]], *, results_format: str = "jsonl", timeout: float | None = None
    ) -> Job:
        """A job of `requests` (dicts: user_id, candidate_ids, k, request_id...); returns at once."""
        return self._job_call(self._jobs.SubmitJob, _job_requests(requests, results_format), timeout)

    def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._job_call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), timeout)

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return self._job_call(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id), timeout)

    def _job_call(self, method: Any, request: Any, timeout: float | None) -> Job:
        try:
            return _job(method(request, timeout=self._deadline(timeout), metadata=self._security.metadata).job)
        except grpc.RpcError as error:
            raise ClientError(error.code(), error.details() or "") from None

    def recommend(
        self, user_id: str, candidate_ids: Sequence[str], k: int | None = None, *, timeout: float | None = None
    ) -> Recommendation:
        try:
            reply = self._stub.Recommend(
                _request(user_id, candidate_ids, k), timeout=self._deadline(timeout), metadata=self._security.metadata
            )
        except grpc.RpcError as error:
            raise ClientError(error.code(), error.details() or "") from None
        return _result(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMeshClient(_Client):
    """asyncio client; create it inside the running event loop."""

    _grpc = grpc.aio

    async def submit_job(
        self, requests: Sequence[Mapping[str, Any]], *, results_format: str = "jsonl", timeout: float | None = None
    ) -> Job:
        return await self._job_call(self._jobs.SubmitJob, _job_requests(requests, results_format), timeout)

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._job_call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), timeout)

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> Job:
        return await self._job_call(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id), timeout)

    async def _job_call(self, method: Any, request: Any, timeout: float | None) -> Job:
        try:
            return _job((await method(request, timeout=self._deadline(timeout), metadata=self._security.metadata)).job)
        except grpc.aio.AioRpcError as error:
            raise ClientError(error.code(), error.details() or "") from None

    async def recommend(
        self, user_id: str, candidate_ids: Sequence[str], k: int | None = None, *, timeout: float | None = None
    ) -> Recommendation:
        try:
            reply = await self._stub.Recommend(
                _request(user_id, candidate_ids, k), timeout=self._deadline(timeout), metadata=self._security.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise ClientError(error.code(), error.details() or "") from None
        return _result(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
