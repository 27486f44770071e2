"""The dynamic batcher's scheduling logic, with a numpy stand-in for the model."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from services.runtime.errors import DeadlineExceeded, InvalidArgument, Overloaded
from services.scoring import batcher as batcher_module
from services.scoring.batcher import INLINE_MAX_NS, INLINE_MAX_ROWS, DynamicBatcher, InferenceFailed, Instance
from services.scoring.config import BatchingPolicy
from services.scoring.stats import Statistics

KEY = ((3,),)


class Model:
    """Doubles `x`; records the rows of every call; can be held to let a queue build up."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(inputs["x"].copy())
        if self.fail:
            raise RuntimeError("model exploded")
        return [inputs["x"] * 2, inputs["x"].sum(axis=1, keepdims=True)]


def rows(n: int, start: float) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3) + start


async def started(
    policy: BatchingPolicy, model: Model, instances: int = 1, inline_max_rows: int = INLINE_MAX_ROWS
) -> tuple[DynamicBatcher, Statistics]:
    stats = Statistics()
    batcher = DynamicBatcher(
        "m v1", policy, [Instance(str(i), model, inline_max_rows=inline_max_rows) for i in range(instances)], stats
    )
    batcher.start()
    return batcher, stats


async def held(model: Model) -> None:
    """Wait (off the loop) until the model is executing its first, held, batch."""
    await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)


async def busy(
    policy: BatchingPolicy,
) -> tuple[Model, DynamicBatcher, Statistics, asyncio.Task[list[np.ndarray]]]:
    """A batcher whose one instance is held executing its first request (rows(1, 0)), so
    whatever is submitted next waits in the queue until `model.gate.set()`."""
    model = Model()
    model.gate.clear()
    batcher, stats = await started(policy, model)
    running = asyncio.create_task(batcher.submit({"x": rows(1, 0)}, 1, KEY))
    await held(model)
    return model, batcher, stats, running


async def test_requests_are_concatenated_and_split_back_exactly() -> None:
    model = Model()
    sizes = [1, 3, 2, 5, 1, 4]
    batcher, stats = await started(
        BatchingPolicy(max_batch_size=64, max_queue_delay_microseconds=5_000_000, preferred_batch_sizes=(sum(sizes),)),
        model,
    )
    inputs = [rows(n, 100.0 * i) for i, n in enumerate(sizes)]
    results = await asyncio.gather(*(batcher.submit({"x": x}, len(x), KEY) for x in inputs))
    await batcher.close()
    assert [len(c) for c in model.calls] == [sum(sizes)]  # one execution for all six
    for x, (doubled, summed) in zip(inputs, results, strict=True):
        assert np.array_equal(doubled, x * 2) and np.array_equal(summed, x.sum(axis=1, keepdims=True))
    assert stats.execution_count == 1 and stats.inference_count == sum(sizes)
    assert stats.queue.count == len(sizes) and stats.compute_infer.count == len(sizes)
    assert list(stats.batches) == [sum(sizes)]


async def test_batches_never_exceed_max_batch_size() -> None:
    model, batcher, stats, first = await busy(BatchingPolicy(max_batch_size=4))
    rest = [asyncio.create_task(batcher.submit({"x": rows(1, i)}, 1, KEY)) for i in range(1, 11)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *rest)
    await batcher.close()
    assert [len(c) for c in model.calls] == [1, 4, 4, 2]
    assert stats.inference_count == 11 and stats.execution_count == 4


async def test_preferred_size_dispatches_without_waiting_for_the_delay() -> None:
    model = Model()
    # A delay of an hour: only reaching the preferred size can dispatch this batch.
    batcher, _ = await started(
        BatchingPolicy(max_batch_size=16, max_queue_delay_microseconds=3_600_000_000, preferred_batch_sizes=(4,)),
        model,
    )
    await asyncio.gather(*(batcher.submit({"x": rows(1, i)}, 1, KEY) for i in range(4)))
    await batcher.close()
    assert [len(c) for c in model.calls] == [4]


async def test_a_full_queue_answers_overloaded() -> None:
    model, batcher, _, running = await busy(BatchingPolicy(max_batch_size=1, max_queue_size=2))
    queued = [asyncio.create_task(batcher.submit({"x": rows(1, i)}, 1, KEY)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="queue is full"):
        await batcher.submit({"x": rows(1, 3)}, 1, KEY)
    model.gate.set()
    await asyncio.gather(running, *queued)
    await batcher.close()
    assert len(model.calls) == 3


async def test_a_request_whose_deadline_passed_in_the_queue_is_not_computed() -> None:
    model, batcher, stats, running = await busy(BatchingPolicy(max_batch_size=8))
    loop = asyncio.get_running_loop()
    doomed = asyncio.create_task(batcher.submit({"x": rows(1, 777)}, 1, KEY, deadline=loop.time() + 0.02))
    patient = asyncio.create_task(batcher.submit({"x": rows(1, 5)}, 1, KEY, deadline=math.inf))
    await asyncio.sleep(0.05)  # the doomed request's deadline passes while the model is busy
    model.gate.set()
    await running
    with pytest.raises(DeadlineExceeded, match="not computed"):
        await doomed
    assert np.array_equal((await patient)[0], rows(1, 5) * 2)
    await batcher.close()
    computed = np.concatenate(model.calls)
    assert 777.0 not in computed and stats.inference_count == 2


async def test_the_next_batch_waits_in_the_instance_while_one_runs() -> None:
    """The worker hands the next batch to the instance's thread while the current one runs,
    so the model starts it as soon as the first returns, without waiting for the event loop."""
    model, batcher, stats, first = await busy(BatchingPolicy(max_batch_size=8))
    second = asyncio.create_task(batcher.submit({"x": rows(2, 10)}, 2, KEY))
    await asyncio.sleep(0.05)  # the second batch is formed and handed over meanwhile
    model.gate.set()
    time.sleep(0.5)  # the event loop is blocked: only the instance's thread can go on
    assert len(model.calls) == 2
    assert np.array_equal((await first)[0], rows(1, 0) * 2)
    assert np.array_equal((await second)[0], rows(2, 10) * 2)
    await batcher.close()
    assert stats.execution_count == 2 and stats.inference_count == 3


@pytest.mark.parametrize(
    "settle", [0.0, 0.05], ids=["cancelled while queued", "cancelled while its batch waits in the instance"]
)
async def test_a_cancelled_request_is_not_computed(settle: float) -> None:
    model, batcher, _, running = await busy(BatchingPolicy(max_batch_size=8))
    gone = asyncio.create_task(batcher.submit({"x": rows(1, 555)}, 1, KEY))
    kept = asyncio.create_task(batcher.submit({"x": rows(1, 7)}, 1, KEY))
    # 0: the next batch is not formed yet; 0.05 s: it is, and waits in the instance's thread.
    await asyncio.sleep(settle)
    gone.cancel()
    model.gate.set()
    await running
    assert np.array_equal((await kept)[0], rows(1, 7) * 2)
    await batcher.close()
    computed = np.concatenate(model.calls)
    assert 555.0 not in computed and 7.0 in computed


async def test_higher_priority_requests_go_first() -> None:
    model, batcher, _, running = await busy(
        BatchingPolicy(max_batch_size=1, priority_levels=3, default_priority_level=2)
    )
    low = asyncio.create_task(batcher.submit({"x": rows(1, 30)}, 1, KEY, priority=3))
    default = asyncio.create_task(batcher.submit({"x": rows(1, 20)}, 1, KEY))
    high = asyncio.create_task(batcher.submit({"x": rows(1, 10)}, 1, KEY, priority=1))
    await asyncio.sleep(0)
    with pytest.raises(InvalidArgument, match="priority 4 is outside 1..3"):
        await batcher.submit({"x": rows(1, 40)}, 1, KEY, priority=4)
    model.gate.set()
    await asyncio.gather(running, low, default, high)
    await batcher.close()
    assert [c[0, 0] for c in model.calls] == [0.0, 10.0, 20.0, 30.0]


async def test_without_priority_levels_priorities_are_ignored() -> None:
    model, batcher, _, running = await busy(BatchingPolicy(max_batch_size=1))
    first = asyncio.create_task(batcher.submit({"x": rows(1, 10)}, 1, KEY, priority=9))
    second = asyncio.create_task(batcher.submit({"x": rows(1, 20)}, 1, KEY, priority=1))
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(running, first, second)
    await batcher.close()
    assert [c[0, 0] for c in model.calls] == [0.0, 10.0, 20.0]


async def test_requests_with_other_shapes_do_not_share_a_batch() -> None:
    model, batcher, _, running = await busy(BatchingPolicy(max_batch_size=16))
    narrow = np.ones((2, 2), np.float32)
    tasks = [
        asyncio.create_task(batcher.submit({"x": rows(2, 1)}, 2, KEY)),
        asyncio.create_task(batcher.submit({"x": narrow}, 2, ((2,),))),
        asyncio.create_task(batcher.submit({"x": rows(1, 3)}, 1, KEY)),
    ]
    await asyncio.sleep(0)
    model.gate.set()
    results = await asyncio.gather(running, *tasks)
    await batcher.close()
    assert np.array_equal(results[2][0], narrow * 2)
    assert [c.shape for c in model.calls] == [(1, 3), (2, 3), (2, 2), (1, 3)]


async def test_oversized_request_is_invalid() -> None:
    batcher, _ = await started(BatchingPolicy(max_batch_size=2), Model())
    with pytest.raises(InvalidArgument, match="exceeds max_batch_size 2"):
        await batcher.submit({"x": rows(3, 0)}, 3, KEY)
    await batcher.close()


async def test_a_failing_execution_fails_its_batch_and_the_worker_carries_on() -> None:
    model = Model()
    batcher, _ = await started(BatchingPolicy(max_batch_size=4), model)
    model.fail = True
    with pytest.raises(InferenceFailed, match="model exploded"):
        await batcher.submit({"x": rows(1, 0)}, 1, KEY)
    model.fail = False
    assert np.array_equal((await batcher.submit({"x": rows(1, 1)}, 1, KEY))[0], rows(1, 1) * 2)
    await batcher.close()


async def test_close_answers_everything_already_queued() -> None:
    model = Model()
    model.gate.clear()
    batcher, _ = await started(BatchingPolicy(max_batch_size=1), model)
    tasks = [asyncio.create_task(batcher.submit({"x": rows(1, i)}, 1, KEY)) for i in range(3)]
    await held(model)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    model.gate.set()
    await closing
    assert [r[0][0, 0] for r in await asyncio.gather(*tasks)] == [0.0, 2.0, 4.0]


async def test_every_instance_takes_work() -> None:
    model = Model()
    model.gate.clear()
    batcher, _ = await started(BatchingPolicy(max_batch_size=1), model, instances=2)
    tasks = [asyncio.create_task(batcher.submit({"x": rows(1, i)}, 1, KEY)) for i in range(2)]
    await held(model)
    for _ in range(100):  # both instance threads pick up a request while the gate is shut
        if batcher.queued == 0:
            break
        await asyncio.sleep(0.01)
    assert batcher.queued == 0
    model.gate.set()
    await asyncio.gather(*tasks)
    await batcher.close()


class Threads(Model):
    """Records which thread ran each call; `pause` seconds per call."""

    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.threads: list[str] = []
        self.pause = pause

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.pause)
        return super().__call__(inputs)


async def test_small_quick_batches_run_on_the_loops_thread_and_the_rest_in_the_instances(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A budget no first run misses, however busy the machine: the rule is under test, not its timing.
    monkeypatch.setattr(batcher_module, "INLINE_MAX_NS", 10**9)
    model = Threads()
    batcher, _ = await started(BatchingPolicy(max_batch_size=1024), model)
    loop_thread = threading.current_thread().name
    first = await batcher.submit({"x": rows(2, 0)}, 2, KEY)  # no timing yet: the instance's thread
    small = await batcher.submit({"x": rows(2, 5)}, 2, KEY)
    large = await batcher.submit({"x": rows(INLINE_MAX_ROWS + 1, 0)}, INLINE_MAX_ROWS + 1, KEY)
    await batcher.close()
    assert model.threads[0].startswith("ort") and model.threads[1] == loop_thread
    assert model.threads[2].startswith("ort")  # too many rows to block the loop with
    # Same answers whichever thread computed them.
    assert np.array_equal(first[0], rows(2, 0) * 2) and np.array_equal(small[0], rows(2, 5) * 2)
    assert np.array_equal(large[0], rows(INLINE_MAX_ROWS + 1, 0) * 2)


async def test_inline_batches_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "INLINE_MAX_NS", 10**9)
    model = Threads()
    batcher, _ = await started(BatchingPolicy(max_batch_size=8), model, inline_max_rows=0)
    for n in range(3):
        await batcher.submit({"x": rows(1, n)}, 1, KEY)
    await batcher.close()
    assert all(name.startswith("ort") for name in model.threads) and len(model.threads) == 3


async def test_a_slow_model_never_runs_on_the_loops_thread() -> None:
    model = Threads(pause=2 * INLINE_MAX_NS / 1e9)  # one row takes twice the inline budget
    batcher, _ = await started(BatchingPolicy(max_batch_size=8), model)
    for n in range(3):
        await batcher.submit({"x": rows(1, n)}, 1, KEY)
    await batcher.close()
    assert all(name.startswith("ort") for name in model.threads) and len(model.threads) == 3
