"""Load generation that reports what a user would see.

closed loop: N clients, each sends its next request when the last one answered.
open loop:   requests arrive on a Poisson schedule at a fixed rate whatever the server does;
             latency is measured from the *intended* send time, so a server that falls
             behind cannot slow the clock and hide its queue (no coordinated omission).
ramp:        open loop at increasing rates until p99 breaks the SLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from services.runtime.allocator import tune_allocator
from services.runtime.event_loop import event_loop_runner

# One request: raises on failure; the exception's `status_name` (or its type) is the error label.
Call = Callable[[int], Awaitable[object]]
# Builds a Call inside the worker's own event loop (channels bind to their loop).
TargetFactory = Callable[[], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]

MAX_IN_FLIGHT = 20_000  # open loop: beyond this the run is reported as overloaded, not queued forever


@dataclass
class RunResult:
    mode: str
    seconds: float
    offered_rate: float | None  # open loop: requests/s asked for
    concurrency: int | None
    latencies_ms: np.ndarray  # successful requests only
    errors: Counter[str] = field(default_factory=Counter)
    dropped: int = 0  # open loop: arrivals never sent because MAX_IN_FLIGHT was reached

    @property
    def completed(self) -> int:
        return int(self.latencies_ms.size)

    @property
    def achieved_rps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def percentiles(self) -> dict[str, float]:
        if self.latencies_ms.size == 0:
            return {}
        points = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}
        values = np.percentile(self.latencies_ms, list(points.values()))
        summary = {name: float(v) for name, v in zip(points, values, strict=True)}
        summary["max"] = float(self.latencies_ms.max())
        summary["mean"] = float(self.latencies_ms.mean())
        return summary

    def to_json(self) -> dict[str, object]:
        total = self.completed + sum(self.errors.values()) + self.dropped
        return {
            "mode": self.mode,
            "seconds": round(self.seconds, 3),
            "offered_rps": self.offered_rate,
            "concurrency": self.concurrency,
            "requests": total,
            "ok": self.completed,
            "errors": dict(self.errors),
            "dropped": self.dropped,
            "rps": round(self.achieved_rps, 1),
            "latency_ms": {k: round(v, 3) for k, v in self.percentiles().items()},
        }


def error_label(error: BaseException) -> str:
    return getattr(error, "status_name", None) or type(error).__name__


def merge(results: list[RunResult]) -> RunResult:
    first = results[0]
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    return RunResult(
        mode=first.mode,
        seconds=max(r.seconds for r in results),
        offered_rate=sum(r.offered_rate or 0 for r in results) or None,
        concurrency=sum(r.concurrency or 0 for r in results) or None,
        latencies_ms=np.concatenate([r.latencies_ms for r in results]),
        errors=errors,
        dropped=sum(r.dropped for r in results),
    )


async def _warm(call: Call, seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline:
        with contextlib.suppress(Exception):  # warm-up failures are not measured
            await call(i)
        i += 1


async def closed_loop(
    call: Call, concurrency: int, seconds: float, tick: Callable[[float], None] | None = None
) -> RunResult:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    deadline = start + seconds

    async def client(index: int) -> None:
        n = index
        while True:
            sent = time.perf_counter()
            if sent >= deadline:
                return
            try:
                await call(n)
                latencies.append((time.perf_counter() - sent) * 1000.0)
            except Exception as error:
                errors[error_label(error)] += 1
            n += concurrency

    async def progress() -> None:
        while tick is not None and time.perf_counter() < deadline:
            await asyncio.sleep(0.5)
            tick(min(time.perf_counter(), deadline) - start)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    reporter.cancel()
    return RunResult("closed", time.perf_counter() - start, None, concurrency, np.asarray(latencies), errors)


async def open_loop(
    call: Call, rate: float, seconds: float, seed: int = 0, tick: Callable[[float], None] | None = None
) -> RunResult:
    rng = np.random.default_rng(seed)
    # Poisson process: exponential gaps; the schedule is fixed before the first send. Drawn
    # well past the window (mean + 6 sd) and cut at its end, so the count is truly Poisson
    # rather than capped at rate x seconds.
    expected = rate * seconds
    count = max(1, int(math.ceil(expected + 6 * math.sqrt(expected) + 10)))
    offsets = np.cumsum(rng.exponential(1.0 / rate, count))
    offsets = offsets[offsets < seconds]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    in_flight = 0
    dropped = 0
    start = time.perf_counter()

    async def one(n: int, intended: float) -> None:
        nonlocal in_flight
        try:
            await call(n)
            latencies.append((time.perf_counter() - intended) * 1000.0)
        except Exception as error:
            errors[error_label(error)] += 1
        finally:
            in_flight -= 1

    tasks = set()
    last_tick = start
    for n, offset in enumerate(offsets.tolist()):
        intended = start + offset
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= MAX_IN_FLIGHT:
            dropped += 1
            continue
        in_flight += 1
        task = asyncio.create_task(one(n, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if tick is not None and time.perf_counter() - last_tick > 0.5:
            last_tick = time.perf_counter()
            tick(last_tick - start)
    if tasks:
        _, unfinished = await asyncio.wait(tasks, timeout=30)
        for task in unfinished:
            task.cancel()
        if unfinished:
            # Still waiting 30 s after the last arrival: failed, not silently left out.
            errors["UNFINISHED_AFTER_30S"] += len(unfinished)
    return RunResult("open", seconds, rate, None, np.asarray(latencies), errors, dropped)


@dataclass(frozen=True)
class Plan:
    """One measurement, picklable so worker processes can run their share of it."""

    mode: str  # closed | open
    seconds: float
    warmup: float
    concurrency: int = 1
    rate: float = 0.0
    seed: int = 0


async def run_plan(factory: TargetFactory, plan: Plan, tick: Callable[[float], None] | None = None) -> RunResult:
    # As every service sets it: the monolith runs in this process, and compares fairly only so.
    tune_allocator()
    call, close = await factory()
    try:
        if plan.warmup > 0:
            await _warm(call, plan.warmup)
        if plan.mode == "closed":
            return await closed_loop(call, plan.concurrency, plan.seconds, tick)
        return await open_loop(call, plan.rate, plan.seconds, plan.seed, tick)
    finally:
        await close()


def _worker(factory: TargetFactory, plan: Plan, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        queue.put(event_loop_runner()(run_plan(factory, plan)))
    except BaseException as error:  # report, never hang the parent
        queue.put(error)


def run_processes(
    factory: TargetFactory, plan: Plan, processes: int, tick: Callable[[float], None] | None = None
) -> RunResult:
    """Split one plan across processes when one client process cannot keep up."""
    if processes <= 1:
        return event_loop_runner()(run_plan(factory, plan, tick))
    context = mp.get_context("spawn")
    queue = context.Queue()
    shares = [
        Plan(
            plan.mode,
            plan.seconds,
            plan.warmup,
            concurrency=max(1, plan.concurrency // processes),
            rate=plan.rate / processes,
            seed=plan.seed + i,
        )
        for i in range(processes)
    ]
    workers = [context.Process(target=_worker, args=(factory, share, queue), daemon=True) for share in shares]
    for w in workers:
        w.start()
    started = time.perf_counter()
    results = []
    deadline = started + plan.warmup + plan.seconds + 60
    while len(results) < processes:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        try:
            item = queue.get(timeout=min(0.5, remaining))
        except Exception:
            if tick is not None:
                tick(max(0.0, time.perf_counter() - started - plan.warmup))
            continue
        if isinstance(item, BaseException):
            raise RuntimeError(f"a load worker failed: {item!r}")
        results.append(item)
    for w in workers:
        w.join(timeout=5)
        if w.is_alive():
            w.kill()
    if len(results) < processes:
        raise RuntimeError("load workers did not finish in time")
    return merge(results)
