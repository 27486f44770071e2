"""Dynamic batching: many small requests in, few large model executions out.

One queue per model version, drained by one worker per model instance (Triton's shape:
the scheduler is per model, each instance pulls its next batch when it is free, so busy
instances never hold requests another could run). A worker:

1. waits for the first request, then takes queued requests in priority/FIFO order while
   they fit (total rows <= max_batch_size, same non-batch dimensions);
2. dispatches at once when the batch is full, reaches a preferred size, or nothing more can
   join; otherwise waits for more arrivals until max_queue_delay after the oldest request;
3. concatenates inputs (one copy; none for a lone request), runs the model in the instance's
   own thread (ONNX Runtime releases the GIL, the event loop keeps serving), and hands each
   request a row slice of the outputs (views, no copy).

While a batch runs, the worker already forms the next one and hands it to the instance's
thread, where it waits its turn (BATCHES_IN_FLIGHT): the model then starts it as soon as
the current one returns, instead of idling until the busy event loop gets round to the
worker again.

Requests whose deadline passed, or whose caller went away, while they were queued are
never computed: they are dropped when the batch is built, and again in the instance's
thread just before it runs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from services.runtime.errors import DeadlineExceeded, InfermeshError, Internal, InvalidArgument, Overloaded, Unavailable
from services.runtime.logs import get_logger
from services.runtime.telemetry import (
    ATTR_BATCH_ID,
    ATTR_BATCH_REQUESTS,
    ATTR_BATCH_SIZE,
    SPAN_SCORING_INFERENCE,
    SPAN_SCORING_QUEUE,
    record_span,
)
from services.scoring.config import BatchingPolicy
from services.scoring.stats import Statistics, VersionMetrics

log = get_logger(__name__)

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

# Batches handed to one instance's thread at a time: the running one and the next. On the
# 2-core VM (one stream, 32 requests of 256 rows in flight, 1 instance) through gRPC went
# from ~50% of raw ONNX Runtime's items/s with 1 to ~62% with 2; 3 was no better
# (docs/benchmarks.md, "Scoring"). The price: a request of a higher priority that arrives
# meanwhile waits for both.
BATCHES_IN_FLIGHT = 2

# A batch this small, whose model last ran this fast per row, runs on the event loop's own
# thread when its instance is idle: handing it to the instance's thread and back costs two
# thread wake-ups, more than it blocks the loop. At c=1 (200 rows, reference ranker, `infermesh
# models bench --concurrency 1`) the server's CPU per call fell 6-22% and p50 0.02-0.23 ms; larger
# batches (coalesced ones, ~1,000 rows at c=32) stay in the thread, where running inline cost
# the mesh throughput (docs/benchmarks.md, "sixth pass"). The price: a model that hangs on such
# a batch hangs the replica's event loop, health checks included (Envoy's health checking then
# ejects the replica), not only its instance's thread; SCORING_INLINE_BATCH_ROWS=0 turns it off.
# The time bound was 250 us until a VM where the reference 200 rows take ~500 us at c=1 sent
# every call to the thread. At 1 ms, on that VM, c=1 (docs/benchmarks.md, "eighth pass"):
# scoring's CPU per request -7% and the mesh's p50 -5%, lower in 6 of 6 rounds; c=32 unchanged.
INLINE_MAX_ROWS = 256
INLINE_MAX_NS = 1_000_000


class InferenceFailed(Internal):
    """The model raised while executing: INTERNAL, through the status table's Internal."""


@dataclass
class Instance:
    """One loaded copy of a model version, with the thread it runs in."""

    label: str
    runner: Runner
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
    )
    inline_max_rows: int = INLINE_MAX_ROWS  # 0: every batch goes to the thread
    in_thread: int = 0  # batches handed to the thread and not yet back
    ns_per_row: float = math.inf  # recent execution time per row; unknown until a batch ran

    def runs_inline(self, rows: int) -> bool:
        return self.in_thread == 0 and rows <= self.inline_max_rows and rows * self.ns_per_row <= INLINE_MAX_NS

    def learn(self, rows: int, nanoseconds: int) -> None:
        latest = nanoseconds / rows
        self.ns_per_row = latest if math.isinf(self.ns_per_row) else 0.8 * self.ns_per_row + 0.2 * latest

    def close(self) -> None:
        self.executor.shutdown(wait=True)


@dataclass(eq=False)
class Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple[tuple[int, ...], ...]  # non-batch dimensions; only equal keys share a batch
    deadline: float  # loop.time(); math.inf when none
    enqueued_at: float  # loop.time()
    enqueued_ns: int  # perf_counter_ns, for statistics
    future: asyncio.Future[list[np.ndarray]]
    # Set when its batch ran, for the request's trace (queue wait, inference): see submit().
    batch_id: int = 0
    batch_rows: int = 0
    batch_requests: int = 0
    started_ns: int = 0
    built_ns: int = 0
    computed_ns: int = 0


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        policy: BatchingPolicy,
        instances: Sequence[Instance],
        stats: Statistics,
        metrics: VersionMetrics | None = None,
        span_attributes: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        # infermesh.model.name/version, infermesh.execution_provider for the inference span.
        self.span_attributes = dict(span_attributes or {})
        self._batch_ids = itertools.count(1)
        self.policy = policy
        self.instances = tuple(instances)
        self.stats = stats
        self.metrics = metrics
        self._delay_s = policy.max_queue_delay_microseconds / 1e6
        self._largest_preferred = max(policy.preferred_batch_sizes, default=0)
        self._heap: list[tuple[int, int, Pending]] = []
        self._order = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self.pending = 0  # submitted and not yet answered

    @property
    def queued(self) -> int:
        return len(self._heap)

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(instance), name=f"batcher {self.name} {instance.label}")
            for instance in self.instances
        ]

    async def close(self) -> None:
        """Stop taking requests; every request already queued is still answered."""
        self._closing = True
        self._wake()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for instance in self.instances:
            await asyncio.get_running_loop().run_in_executor(None, instance.close)

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        key: tuple[tuple[int, ...], ...],
        deadline: float = math.inf,
        priority: int = 0,
    ) -> list[np.ndarray]:
        """Queue one request and wait for its outputs (row slices of its batch's outputs)."""
        policy = self.policy
        if self._closing:
            raise Unavailable(f"{self.name} is unloading; retry")
        if policy.max_batch_size and rows > policy.max_batch_size:
            raise InvalidArgument(f"batch of {rows} rows exceeds max_batch_size {policy.max_batch_size}")
        if policy.max_queue_size and len(self._heap) >= policy.max_queue_size:
            raise Overloaded(f"{self.name}: queue is full ({policy.max_queue_size} requests); retry later")
        level = self._level(priority)
        loop = asyncio.get_running_loop()
        pending = Pending(inputs, rows, key, deadline, loop.time(), time.perf_counter_ns(), loop.create_future())
        heapq.heappush(self._heap, (level, next(self._order), pending))
        self._count_pending(1)
        self._wake()
        try:
            return await pending.future
        finally:
            self._count_pending(-1)
            if pending.computed_ns:
                self._trace(pending)

    def _trace(self, pending: Pending) -> None:
        """The request's queue wait and its batch's inference, as spans of its own trace."""
        batch = {ATTR_BATCH_SIZE: pending.batch_rows, ATTR_BATCH_ID: pending.batch_id}
        record_span(
            SPAN_SCORING_QUEUE,
            pending.enqueued_ns,
            pending.started_ns,
            {**batch, ATTR_BATCH_REQUESTS: pending.batch_requests},
        )
        record_span(SPAN_SCORING_INFERENCE, pending.built_ns, pending.computed_ns, {**self.span_attributes, **batch})

    def _level(self, priority: int) -> int:
        """Queue order: level 1 first; without priority_levels every request is equal (FIFO)."""
        levels = self.policy.priority_levels
        if not levels:
            return 0
        if priority > levels:
            raise InvalidArgument(f"priority {priority} is outside 1..{levels} (0 = the default level)")
        return priority or self.policy.default_priority_level

    def _count_pending(self, delta: int) -> None:
        self.pending += delta
        if self.metrics is not None:
            self.metrics.pending.inc(delta)

    # ------------------------------------------------------------------ forming batches

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, _release, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    def _take(self, batch: list[Pending], rows: int, now: float) -> tuple[int, bool]:
        """Move fitting requests from the queue into `batch`; returns (rows, blocked)."""
        limit = self.policy.max_batch_size
        heap = self._heap
        while heap:
            pending = heap[0][2]
            if pending.future.done():  # the caller went away
                heapq.heappop(heap)
                continue
            if pending.deadline <= now:
                heapq.heappop(heap)
                self._expire(pending)
                continue
            if batch and (limit == 0 or pending.key != batch[0].key or rows + pending.rows > limit):
                return rows, True
            heapq.heappop(heap)
            batch.append(pending)
            rows += pending.rows
            if limit == 0 or rows >= limit:
                return rows, True
        return rows, False

    def _expire(self, pending: Pending) -> None:
        waited_ms = (time.perf_counter_ns() - pending.enqueued_ns) / 1e6
        pending.future.set_exception(
            DeadlineExceeded(f"{self.name}: request timed out after {waited_ms:.1f} ms in the queue; not computed")
        )

    def _complete(self, rows: int, blocked: bool) -> bool:
        if blocked or self._delay_s == 0:
            return True
        if rows >= self._largest_preferred > 0:
            return True
        return rows in self.policy.preferred_batch_sizes

    async def _next_batch(self) -> list[Pending] | None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._heap:
                if self._closing:
                    return None
                await self._wait(None)
            batch: list[Pending] = []
            rows = 0
            while True:
                rows, blocked = self._take(batch, rows, loop.time())
                if not batch:
                    break  # everything queued had expired or was cancelled
                if self._complete(rows, blocked) or self._closing:
                    return batch
                remaining = batch[0].enqueued_at + self._delay_s - loop.time()
                if remaining <= 0:
                    return batch
                await self._wait(remaining)

    # ------------------------------------------------------------------ executing

    async def _work(self, instance: Instance) -> None:
        slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        try:
            while True:
                await slots.acquire()
                batch = await self._next_batch()
                if batch is None:
                    return
                task = asyncio.create_task(self._run(instance, batch))
                running.add(task)
                task.add_done_callback(finished)
        finally:
            # Closing: what was handed to the instance is answered before it is closed.
            await asyncio.gather(*running, return_exceptions=True)

    async def _run(self, instance: Instance, batch: list[Pending]) -> None:
        try:
            await self._execute(instance, batch)
        except Exception as error:  # never let one batch kill the worker
            log.exception("batch failed", model=self.name, instance=instance.label)
            message = str(error) if isinstance(error, InfermeshError) else "batch failed; see the server log"
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(InferenceFailed(f"{self.name}: {message}"))

    async def _execute(self, instance: Instance, live: list[Pending]) -> None:
        """Run one batch formed by _next_batch (whose requests were live when it was formed)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        inputs = live[0].inputs if len(live) == 1 else _concatenate(live)
        built = time.perf_counter_ns()
        # Deadlines are in loop time; the instance's thread reads the same clock through this.
        offset = loop.time() - time.monotonic()
        try:
            if instance.runs_inline(sum(p.rows for p in live)):
                ran, ready, outputs = _run_live(instance, live, inputs, offset)
            else:
                instance.in_thread += 1
                try:
                    ran, ready, outputs = await loop.run_in_executor(
                        instance.executor, _run_live, instance, live, inputs, offset
                    )
                finally:
                    instance.in_thread -= 1
        except Exception as error:
            self._fail(instance, live, error)
            return
        computed = time.perf_counter_ns()
        if len(ready) != len(live):
            for pending in live:
                if pending not in ready and not pending.future.done():
                    self._expire(pending)
            if not ready:
                return
        # Waiting for the instance is queueing: statistics and spans read as if the batch had
        # been built just before it ran.
        self._answer(ready, outputs, started=ran - (built - started), built=ran, computed=computed)

    def _fail(self, instance: Instance, batch: list[Pending], error: Exception) -> None:
        rows = sum(p.rows for p in batch)
        log.error("model execution failed", model=self.name, instance=instance.label, rows=rows, error=str(error))
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(InferenceFailed(f"{self.name}: model execution failed: {error}"))

    def _answer(self, ready: list[Pending], outputs: list[np.ndarray], started: int, built: int, computed: int) -> None:
        """Hand each request its rows of the outputs; record the batch for statistics and traces."""
        rows = sum(p.rows for p in ready)
        for pending in ready:
            self.stats.queue.add(started - pending.enqueued_ns)
        batch_id = next(self._batch_ids)
        for pending in ready:
            pending.batch_id, pending.batch_rows, pending.batch_requests = batch_id, rows, len(ready)
            pending.started_ns, pending.built_ns, pending.computed_ns = started, built, computed
        _split(ready, outputs, rows)
        finished = time.perf_counter_ns()
        self.stats.record_batch(len(ready), rows, built - started, computed - built, finished - computed)
        if self.metrics is not None:
            self.metrics.exec_count.inc()
            self.metrics.count.inc(rows)
            self.metrics.batch_size.observe(rows)
            self.metrics.queue_us.inc(sum(started - p.enqueued_ns for p in ready) / 1000)
            # Per request, as Triton counts them: each waited for the whole batch.
            self.metrics.compute_input_us.inc((built - started) * len(ready) / 1000)
            self.metrics.compute_us.inc((computed - built) * len(ready) / 1000)
            self.metrics.compute_output_us.inc((finished - computed) * len(ready) / 1000)


def _run_live(
    instance: Instance, live: list[Pending], inputs: dict[str, np.ndarray], loop_offset: float
) -> tuple[int, list[Pending], list[np.ndarray]]:
    """(when it ran, the requests it ran, their outputs), in the instance's thread (or the
    event loop's, for a small quick batch: Instance.runs_inline).

    There the batch may have waited for the one before it: requests that expired or were
    cancelled meanwhile are left out here, not computed. `loop_offset` turns time.monotonic()
    into the event loop's clock, which deadlines are in.
    """
    ran = time.perf_counter_ns()
    now = time.monotonic() + loop_offset
    ready = [p for p in live if not p.future.done() and p.deadline > now]
    if not ready:
        return ran, ready, []
    if len(ready) < len(live):
        inputs = ready[0].inputs if len(ready) == 1 else _concatenate(ready)
    outputs = instance.runner(inputs)
    instance.learn(sum(p.rows for p in ready), time.perf_counter_ns() - ran)
    return ran, ready, outputs


def _concatenate(batch: list[Pending]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}


def _split(batch: list[Pending], outputs: list[np.ndarray], rows: int) -> None:
    """Row slices (views) of each output, in batch order; exact inverse of _concatenate."""
    if len(batch) == 1:
        if not batch[0].future.done():
            batch[0].future.set_result(outputs)
        return
    wrong = [o.shape for o in outputs if o.ndim == 0 or o.shape[0] != rows]
    if wrong:
        raise InferenceFailed(f"outputs {wrong} do not have the batch's {rows} rows first; cannot split")
    start = 0
    for pending in batch:
        end = start + pending.rows
        if not pending.future.done():
            pending.future.set_result([o[start:end] for o in outputs])
        start = end


def _release(waiter: asyncio.Future[None]) -> None:
    """A waiter's timeout: it wakes unless already woken."""
    if not waiter.done():
        waiter.set_result(None)
