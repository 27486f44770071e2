"""Shadow traffic: a copy of a scoring request sent to a candidate model version.

The copy runs as a background task that the response never waits for; its result is
compared with the primary's scores (metrics, a debug log line) and thrown away. At most
`max_in_flight` copies run at once; beyond that they are dropped and counted, so a slow
candidate can never pile up work or memory in the gateway.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import time

import grpc
import numpy as np
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc

from gateway.experiments import Shadow
from gateway.metrics import GatewayMetrics
from services.runtime.logs import get_logger

log = get_logger(__name__)

OVERLAP_K = 20


class ShadowRunner:
    def __init__(
        self, scoring: inference_pb2_grpc.GRPCInferenceServiceStub, metrics: GatewayMetrics | None = None
    ) -> None:
        self._scoring = scoring
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._random = random.Random()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(
        self, shadow: Shadow, primary: inference_pb2.ModelInferRequest, primary_scores: np.ndarray
    ) -> bool:
        """Fire a copy of `primary` at the shadow model; True when it was sent."""
        if shadow.percent < 100 and self._random.random() * 100 >= shadow.percent:
            return False
        if len(self._tasks) >= shadow.max_in_flight:
            self._count(shadow, "dropped")
            return False
        request = inference_pb2.ModelInferRequest()
        request.CopyFrom(primary)
        request.model_name = shadow.model
        request.model_version = shadow.version
        # A context of its own: the copy is no part of the request's trace (which ends
        # before it does) and nothing of the request's context is kept alive by it.
        task = asyncio.get_running_loop().create_task(
            self._run(shadow, request, primary_scores), context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if self._metrics is not None:
            self._metrics.shadow_in_flight.set(len(self._tasks))
        return True

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._metrics is not None:
            self._metrics.shadow_in_flight.set(len(self._tasks))

    async def _run(self, shadow: Shadow, request: inference_pb2.ModelInferRequest, primary: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            reply = await self._scoring.ModelInfer(request, timeout=shadow.timeout_seconds)
        except grpc.aio.AioRpcError as error:
            outcome = "timeout" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "error"
            self._count(shadow, outcome)
            log.debug("shadow scoring failed", model=shadow.model, version=shadow.version, code=error.code().name)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # a shadow must never take anything down with it
            self._count(shadow, "error")
            log.exception("shadow scoring failed", model=shadow.model, version=shadow.version)
            return
        seconds = time.perf_counter() - started
        raw = reply.raw_output_contents[0] if reply.raw_output_contents else b""
        if len(raw) != primary.size * 4:
            self._count(shadow, "mismatch")
            log.warning(
                "shadow scores do not match the request",
                model=shadow.model, version=shadow.version, bytes=len(raw), rows=primary.size,
            )
            return
        scores = np.frombuffer(raw, dtype="<f4")
        diff, overlap = compare(primary, scores)
        version = _label(shadow)
        if self._metrics is not None:
            self._metrics.shadow_latency.labels(shadow.model, version).observe(seconds)
            self._metrics.shadow_diff.labels(shadow.model, version).observe(diff)
            self._metrics.shadow_overlap.labels(shadow.model, version).observe(overlap)
        self._count(shadow, "ok")
        log.debug(
            "shadow compared",
            model=shadow.model, version=reply.model_version, mean_abs_diff=round(diff, 6), topk_overlap=round(overlap, 3),
            milliseconds=round(seconds * 1000, 3),
        )

    def _count(self, shadow: Shadow, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.shadow.labels(shadow.model, _label(shadow), outcome).inc()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _label(shadow: Shadow) -> str:
    return shadow.version or "newest"


def compare(primary: np.ndarray, shadow: np.ndarray, k: int = OVERLAP_K) -> tuple[float, float]:
    """(mean |primary - shadow|, share of the primary's top k also in the shadow's top k)."""
    if primary.size == 0:
        return 0.0, 1.0
    diff = float(np.mean(np.abs(primary.astype(np.float64) - shadow.astype(np.float64))))
    k = min(k, primary.size)
    top_primary = np.argpartition(-primary, k - 1)[:k]
    top_shadow = np.argpartition(-shadow, k - 1)[:k]
    return diff, len(np.intersect1d(top_primary, top_shadow)) / k
