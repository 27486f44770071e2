"""Shadow traffic: copies of scoring requests sent to a candidate model version, in batches.

A copy's result never reaches the caller, so copies need not go out one by one: they are
queued and sent together, one ModelInfer whose rows are the queued requests' rows (joined
as the bytes they arrived in), when `flush_seconds` passed since the first one queued or
the batch reached `max_batch_requests` requests or `max_batch_rows` rows. Each call's
gRPC, Envoy and scoring-server work is then paid once per batch instead of once per
request: at concurrency 1 the copy of every request is what competed with the next
request for the two cores.

The reply is split back by each request's row count and compared with that request's
primary scores (metrics per request, exactly as one call per request would give them).
Bounds, so a slow candidate can never pile up work or memory in the gateway: at most
`max_in_flight` shadow calls run at once (the shadow's setting), and at most
`max_queued` copies wait; beyond that copies are dropped and counted. Nothing here is
awaited by a request: submit() only appends to a list; building and sending a batch
happen in a background task with a context of its own (no part of any request's trace).
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np

from gateway.experiments import Shadow
from gateway.metrics import GatewayMetrics
from gateway.stage_calls import concatenate_rows, input_layout, request_rows
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from services.runtime.logs import get_logger

log = get_logger(__name__)

OVERLAP_K = 20
# A copy waits at most this long for others to join it. At ~110 req/s (concurrency 1 on
# the 2-core VM) that is ~10 requests a call; shadow results are only ever read as metrics.
FLUSH_SECONDS = 0.1
MAX_BATCH_REQUESTS = 32
MAX_BATCH_ROWS = 4096  # the reference model's max_batch_size (GATEWAY_COALESCE_MAX_ROWS too)
MAX_QUEUED = 64  # copies waiting for a call; beyond it they are dropped


@dataclass(eq=False)
class _Batch:
    shadow: Shadow
    requests: list[inference_pb2.ModelInferRequest] = field(default_factory=list)
    primaries: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class ShadowRunner:
    def __init__(
        self,
        scoring: inference_pb2_grpc.GRPCInferenceServiceStub,
        metrics: GatewayMetrics | None = None,
        *,
        flush_seconds: float = FLUSH_SECONDS,
        max_batch_requests: int = MAX_BATCH_REQUESTS,
        max_batch_rows: int = MAX_BATCH_ROWS,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._scoring = scoring
        self._metrics = metrics
        self._flush_seconds = flush_seconds
        self._max_requests, self._max_rows = max_batch_requests, max_batch_rows
        self._max_queued = max_queued
        # Batches being filled, one per (shadow, input layout); full or due ones waiting
        # for a call slot, oldest first.
        self._filling: dict[tuple[object, ...], _Batch] = {}
        self._due: deque[_Batch] = deque()
        self._queued = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._random = random.Random()

    @property
    def in_flight(self) -> int:
        """Shadow calls running now."""
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Copies waiting to be sent."""
        return self._queued

    def submit(self, shadow: Shadow, primary: inference_pb2.ModelInferRequest, primary_scores: np.ndarray) -> bool:
        """Queue a copy of `primary` for the shadow model; True when it was taken."""
        if shadow.percent < 100 and self._random.random() * 100 >= shadow.percent:
            return False
        if self._queued >= self._max_queued:
            self._count(shadow, "dropped")
            return False
        if not primary.inputs or len(primary.raw_input_contents) != len(primary.inputs):
            self._count(shadow, "error")  # nothing to copy as rows (never from the pipeline)
            return False
        rows = request_rows(primary)
        key = (shadow, input_layout(primary), tuple(o.name for o in primary.outputs))
        batch = self._filling.get(key)
        if batch is not None and (batch.rows + rows > self._max_rows):
            self._close(key)  # this copy would overfill it: it goes as it is
            batch = None
        if batch is None:
            batch = self._filling[key] = _Batch(shadow)
            # Timers and tasks run in contexts of their own: nothing of the request that
            # queued a copy (its trace, which ends before the copy is sent) is kept alive.
            batch.timer = asyncio.get_running_loop().call_later(
                self._flush_seconds, self._close, key, context=contextvars.Context()
            )
        batch.requests.append(primary)
        batch.primaries.append(primary_scores)
        batch.rows += rows
        self._queued += 1
        if len(batch.requests) >= self._max_requests or batch.rows >= self._max_rows:
            self._close(key)
        return True

    def _close(self, key: tuple[object, ...]) -> None:
        """The batch being filled under `key` stops taking copies and goes when it can."""
        batch = self._filling.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self._due.append(batch)
        self._send_due()

    def _send_due(self) -> None:
        while self._due and len(self._tasks) < self._due[0].shadow.max_in_flight:
            batch = self._due.popleft()
            self._queued -= len(batch.requests)
            task = asyncio.get_running_loop().create_task(self._run(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._done)
        if self._metrics is not None:
            self._metrics.shadow_in_flight.set(len(self._tasks))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._send_due()

    async def _run(self, batch: _Batch) -> None:
        shadow = batch.shadow
        if self._metrics is not None:
            self._metrics.observe_batch("shadow", len(batch.requests))
        started = time.perf_counter()
        try:
            reply = await self._scoring.ModelInfer(combined(batch), timeout=shadow.timeout_seconds)
        except grpc.aio.AioRpcError as error:
            outcome = "timeout" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "error"
            self._count(shadow, outcome, len(batch.requests))
            log.debug("shadow scoring failed", model=shadow.model, version=shadow.version, code=error.code().name)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # a shadow must never take anything down with it
            self._count(shadow, "error", len(batch.requests))
            log.exception("shadow scoring failed", model=shadow.model, version=shadow.version)
            return
        seconds = time.perf_counter() - started
        self._compare(batch, reply, seconds)

    def _compare(self, batch: _Batch, reply: inference_pb2.ModelInferResponse, seconds: float) -> None:
        """Each request's slice of the shadow scores against its own primary scores."""
        shadow = batch.shadow
        raw = reply.raw_output_contents[0] if reply.raw_output_contents else b""
        sizes = [p.size for p in batch.primaries]
        if len(raw) != sum(sizes) * 4:
            self._count(shadow, "mismatch", len(sizes))
            log.warning(
                "shadow scores do not match the requests",
                model=shadow.model,
                version=shadow.version,
                bytes=len(raw),
                rows=sum(sizes),
                requests=len(sizes),
            )
            return
        scores = np.frombuffer(raw, dtype="<f4")
        ends = np.cumsum(sizes)
        compared = [
            compare(p, scores[end - p.size : end]) for p, end in zip(batch.primaries, ends.tolist(), strict=False)
        ]
        version = _label(shadow)
        if self._metrics is not None:
            self._metrics.shadow_latency.labels(shadow.model, version).observe(seconds)
            diff_metric = self._metrics.shadow_diff.labels(shadow.model, version)
            overlap_metric = self._metrics.shadow_overlap.labels(shadow.model, version)
            for diff, overlap in compared:
                diff_metric.observe(diff)
                overlap_metric.observe(overlap)
        self._count(shadow, "ok", len(compared))
        log.debug(
            "shadow compared",
            model=shadow.model,
            version=reply.model_version,
            requests=len(compared),
            mean_abs_diff=round(sum(d for d, _ in compared) / len(compared), 6),
            topk_overlap=round(sum(o for _, o in compared) / len(compared), 3),
            milliseconds=round(seconds * 1000, 3),
        )

    def _count(self, shadow: Shadow, outcome: str, requests: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.shadow.labels(shadow.model, _label(shadow), outcome).inc(requests)

    async def close(self) -> None:
        """Drop what waits, cancel what runs."""
        for key in list(self._filling):
            batch = self._filling.pop(key)
            if batch.timer is not None:
                batch.timer.cancel()
        self._due.clear()
        self._queued = 0
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def combined(batch: _Batch) -> inference_pb2.ModelInferRequest:
    """One request to the shadow model whose rows are every queued request's rows, in order
    (the scoring coalescer's concatenation, addressed to the shadow model)."""
    request, _ = concatenate_rows(batch.requests)
    request.model_name, request.model_version = batch.shadow.model, batch.shadow.version
    return request


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
