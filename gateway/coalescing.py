"""Cross-request coalescing: one stage's calls from concurrent requests sent as one call.

Per stage, up to `max_in_flight` calls run at once. A request that finds the stage idle
calls it at once, alone, on the single-request RPC: concurrency 1 pays nothing and waits
on no timer. While the stage is busy, requests queue; when a call returns (or the queue
reaches `max_batch`, or no call was sent for `max_wait` seconds: a stage stuck on a slow
call, e.g. a hung Redis, must not hold everyone behind it), the queue goes out as one batched
call, and each request gets its own result back, or its own error (a per-request status in
the batch reply, or the whole call's error). Each request keeps its own deadline: it stops waiting when its budget for
the stage is spent, and a request whose deadline passed in the queue is never sent.

Traces: a request that waited gets a span `infermesh.gateway.coalesced` (attributes: the
stage, its wait to join in ms, the batch size) linked to the batch's span
`infermesh.gateway.batch`, which is the parent of the batched call's CLIENT span and links
back to every request it served. A request that went alone keeps today's shape: its CLIENT
span directly under its Recommend span.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind

from services.runtime.telemetry import (
    ATTR_BATCH_REQUESTS,
    ATTR_COALESCE_WAIT_MS,
    ATTR_STAGE,
    SPAN_GATEWAY_BATCH,
    SPAN_GATEWAY_COALESCED,
    tracer,
)

Q = TypeVar("Q")
R = TypeVar("R")

# Send a batch: requests in, one result or exception per request out, same order.
BatchSender = Callable[[Sequence[Q], float], Awaitable[list["R | BaseException"]]]
# Send one request alone (the single-request RPC); raises the call's error.
SingleSender = Callable[[Q, float], Awaitable[R]]


@dataclass(eq=False)
class _Waiting(Generic[Q, R]):
    request: Q
    deadline: float  # time.monotonic()
    joined: float
    future: asyncio.Future[R]
    span: Span | None = field(default=None)
    # The batch it went out in, and the task sending it: cancelled once nobody waits for it.
    batch: list[_Waiting[Q, R]] | None = field(default=None)
    task: asyncio.Task[None] | None = field(default=None)


def _expire(future: asyncio.Future[R]) -> None:
    """A request's deadline for the stage passed while it waited: it stops waiting."""
    if not future.done():
        future.set_exception(TimeoutError())


class Coalescer(Generic[Q, R]):
    def __init__(
        self,
        stage: str,
        single: SingleSender[Q, R],
        batch: BatchSender[Q, R],
        *,
        max_batch: int,
        max_in_flight: int,
        observe_batch: Callable[[str, int], None] | None = None,
        size: Callable[[Q], int] | None = None,
        max_size: int = 0,
        max_wait: float = 0.05,
    ) -> None:
        self.stage = stage
        self._single, self._batch = single, batch
        self._max_batch, self._max_in_flight = max_batch, max_in_flight
        # Optionally a second cap: the summed size of a batch (scoring: rows per call).
        self._size, self._max_size = size, max_size
        self._max_wait = max_wait
        self._last_sent = 0.0  # time.monotonic() of the latest call sent
        self._stall_check: asyncio.TimerHandle | None = None
        self._observe = observe_batch
        self._queue: deque[_Waiting[Q, R]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, request: Q, timeout: float) -> R:
        if self._in_flight < self._max_in_flight and not self._queue:
            return await self._alone(request, timeout)
        waiting = self._join(request, timeout)
        # A timer that fails the future at the deadline rather than asyncio.wait_for, which
        # wraps the wait in a task, a second future and callbacks of its own (on a request
        # path that waits here once per stage, at c=32 nearly always).
        expiry = asyncio.get_running_loop().call_later(timeout, _expire, waiting.future)
        try:
            return await waiting.future
        except (TimeoutError, asyncio.CancelledError):
            self._abandon(waiting)
            raise
        finally:
            expiry.cancel()
            if waiting.span is not None:
                waiting.span.end()

    @staticmethod
    def _abandon(waiting: _Waiting[Q, R]) -> None:
        """A request that stopped waiting: its batch's call is cancelled once every request in
        it has (as a request's own call is when its caller goes), so nothing downstream keeps
        working, or holding rows in a model's batcher, for answers nobody will read."""
        if waiting.task is None or waiting.batch is None or waiting.task.done():
            return
        if all(w.future.done() for w in waiting.batch):
            waiting.task.cancel()

    async def _alone(self, request: Q, timeout: float) -> R:
        self._in_flight += 1
        self._last_sent = time.monotonic()
        if self._observe is not None:
            self._observe(self.stage, 1)
        try:
            return await self._single(request, timeout)
        finally:
            self._in_flight -= 1
            self._flush()

    def _join(self, request: Q, timeout: float) -> _Waiting[Q, R]:
        now = time.monotonic()
        waiting = _Waiting(request, now + timeout, now, asyncio.get_running_loop().create_future())
        if trace.get_current_span().is_recording():
            waiting.span = tracer().start_span(SPAN_GATEWAY_COALESCED, attributes={ATTR_STAGE: self.stage})
        self._queue.append(waiting)
        if len(self._queue) >= self._max_batch:
            self._send(self._take())  # a full batch goes now, busy or not
        elif self._stall_check is None:
            self._stall_check = asyncio.get_running_loop().call_later(self._max_wait, self._unstall)
        return waiting

    def _unstall(self) -> None:
        """The queue goes now, busy or not, if no call was sent for max_wait seconds."""
        self._stall_check = None
        if not self._queue:
            return
        quiet = time.monotonic() - self._last_sent
        if quiet >= self._max_wait:
            batch = self._take()
            if batch:
                self._send(batch)
        if self._queue:
            delay = self._max_wait - quiet if quiet < self._max_wait else self._max_wait
            self._stall_check = asyncio.get_running_loop().call_later(delay, self._unstall)

    def _flush(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            batch = self._take()
            if batch:
                self._send(batch)

    def _take(self) -> list[_Waiting[Q, R]]:
        """Up to max_batch queued requests that still wait (not timed out or cancelled), and
        no more than max_size in all (a request over it alone still goes, alone)."""
        batch: list[_Waiting[Q, R]] = []
        total = 0
        while self._queue and len(batch) < self._max_batch:
            waiting = self._queue[0]
            if waiting.future.done():
                self._queue.popleft()
                continue
            if self._size is not None:
                size = self._size(waiting.request)
                if batch and total + size > self._max_size:
                    break
                total += size
            batch.append(self._queue.popleft())
        return batch

    def _send(self, batch: list[_Waiting[Q, R]]) -> None:
        self._in_flight += 1
        self._last_sent = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._run(batch))
        for waiting in batch:
            waiting.batch, waiting.task = batch, task
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting[Q, R]]) -> None:
        sent = time.monotonic()
        timeout = max(w.deadline for w in batch) - sent
        if self._observe is not None:
            self._observe(self.stage, len(batch))
        batch_span = self._batch_span(batch, sent)
        token = otel_context.attach(trace.set_span_in_context(batch_span))
        results: list[R | BaseException] = []
        try:
            results = await self._results(batch, timeout)
        except asyncio.CancelledError:
            pass  # every request in it stopped waiting (_abandon): nothing to deliver
        finally:
            otel_context.detach(token)
            batch_span.end()
            self._in_flight -= 1
        for waiting, result in zip(batch, results, strict=False):
            if waiting.future.done():  # it stopped waiting (its deadline) meanwhile
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)
        self._flush()

    async def _results(self, batch: list[_Waiting[Q, R]], timeout: float) -> list[R | BaseException]:
        try:
            if len(batch) == 1:
                return [await self._single(batch[0].request, timeout)]
            results = await self._batch([w.request for w in batch], timeout)
        except Exception as error:  # the whole call failed: every request gets its error
            return [error] * len(batch)
        if len(results) != len(batch):
            error = RuntimeError(f"{self.stage}: {len(results)} results for a batch of {len(batch)}")
            return [error] * len(batch)
        return results

    def _batch_span(self, batch: list[_Waiting[Q, R]], sent: float) -> Span:
        """The batch's span, under the first traced request's span; links both ways."""
        traced = [w for w in batch if w.span is not None]
        if not traced:
            return trace.INVALID_SPAN
        parent = trace.set_span_in_context(traced[0].span)  # type: ignore[arg-type]
        links = [Link(w.span.get_span_context()) for w in traced]  # type: ignore[union-attr]
        span = tracer().start_span(
            SPAN_GATEWAY_BATCH,
            context=parent,
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={ATTR_STAGE: self.stage, ATTR_BATCH_REQUESTS: len(batch)},
        )
        for waiting in traced:
            member = waiting.span
            assert member is not None
            member.add_link(span.get_span_context())
            member.set_attribute(ATTR_COALESCE_WAIT_MS, round((sent - waiting.joined) * 1000.0, 3))
            member.set_attribute(ATTR_BATCH_REQUESTS, len(batch))
        return span
