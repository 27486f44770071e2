"""Opt-in prediction cache in Redis: identical requests to the same model version are answered
from a stored response.

Key: model + version + a 128-bit BLAKE2b of every input tensor (name, datatype, shape, typed
contents) and raw input bytes, plus the requested outputs. Value: the serialized response
(without its id), with a TTL. The cache is an optimisation only: any Redis error (refused,
timed out, gone) turns it off for `retry_seconds`, logged once, and the request is computed
as if there were no cache; after that the next request tries Redis again. Its Redis is
opened with the scoring service's credentials and TLS (SCORING_REDIS_USERNAME, _PASSWORD,
_TLS_*: services/runtime/redis_connection.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import cast

from redis.exceptions import RedisError

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.logs import get_logger
from services.runtime.redis_connection import RedisTarget
from services.scoring.stats import ScoringMetrics

log = get_logger(__name__)

KEY_PREFIX = "scoring:cache:"
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


def _update(digest: hashlib.blake2b, data: bytes) -> None:
    # Length-prefixed, so no two different field sequences hash the same bytes.
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def cache_key(model: str, version: str, request: pb.ModelInferRequest) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in request.inputs:
        _update(digest, tensor.SerializeToString(deterministic=True))
    for raw in request.raw_input_contents:
        _update(digest, raw)
    for output in request.outputs:
        _update(digest, output.name.encode())
    return f"{KEY_PREFIX}{model}:{version}:{digest.hexdigest()}"


class PredictionCache:
    def __init__(
        self,
        redis: str | RedisTarget,
        timeout_seconds: float = 0.1,
        retry_seconds: float = 5.0,
        metrics: ScoringMetrics | None = None,
    ) -> None:
        target = RedisTarget.of(redis)
        self._client = target.async_client(
            socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds, retry_on_timeout=False
        )
        self._retry_seconds = retry_seconds
        self._metrics = metrics
        self._down_until = 0.0
        self._writes: set[asyncio.Task[None]] = set()
        self._set_available(True)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _set_available(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache_available.set(1 if up else 0)

    def _trip(self, error: BaseException) -> None:
        if self.available:
            log.warning(
                "prediction cache unavailable; serving without it",
                error=repr(error),
                retry_seconds=self._retry_seconds,
            )
        self._down_until = time.monotonic() + self._retry_seconds
        self._set_available(False)

    async def get(self, key: str) -> pb.ModelInferResponse | None:
        if not self.available:
            return None
        try:
            # The client decodes nothing (no decode_responses): a value is bytes, whatever
            # the library's return type (bytes | str) allows.
            data = cast("bytes | None", await self._client.get(key))
        except _FAILURES as error:
            self._trip(error)
            return None
        self._set_available(True)
        if data is None:
            return None
        response = pb.ModelInferResponse()
        response.ParseFromString(data)
        return response

    def put(self, key: str, response: pb.ModelInferResponse, ttl_seconds: int) -> None:
        """Store in the background: the caller's response does not wait for Redis."""
        if not self.available:
            return
        request_id, response.id = response.id, ""  # ids belong to one request, not to the cache
        data = response.SerializeToString()
        response.id = request_id
        task = asyncio.create_task(self._put(key, data, ttl_seconds))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, data: bytes, ttl_seconds: int) -> None:
        try:
            await self._client.set(key, data, ex=ttl_seconds)
        except _FAILURES as error:
            self._trip(error)

    async def close(self) -> None:
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self._client.aclose()
