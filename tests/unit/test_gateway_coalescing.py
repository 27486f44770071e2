"""The gateway's cross-request coalescing (gateway/coalescing.py, gateway/stage_calls.py):
who goes alone, who waits and joins a batch, how results and errors split back, deadlines
inside a batch, and the spans and links a batch leaves. Senders are fakes: the logic only."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import coalescing
from gateway.coalescing import Coalescer
from gateway.stage_calls import concatenate_rows, rpc_error, split_scores
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2


class FakeStage:
    """A stage whose calls finish when the test says: records every call it got."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.batch_release = self.release  # batched calls wait on this one
        self.observed: list[int] = []

    async def single(self, request: str, timeout: float) -> str:
        self.calls.append([request])
        await self.release.wait()
        if request.startswith("bad"):
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"{request} is bad")
        return request.upper()

    async def batch(self, requests: Sequence[str], timeout: float) -> list[str | BaseException]:
        self.calls.append(list(requests))
        await self.batch_release.wait()
        if "fail-all" in requests:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "stage down")
        return [
            rpc_error(grpc.StatusCode.NOT_FOUND, f"{r} unknown") if r.startswith("bad") else r.upper() for r in requests
        ]

    def coalescer(self, max_batch: int = 8, max_in_flight: int = 1) -> Coalescer:
        return Coalescer(
            "features",
            self.single,
            self.batch,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            observe_batch=lambda stage, n: self.observed.append(n),
        )


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_stage_is_called_at_once_alone() -> None:
    stage = FakeStage()
    stage.release.set()
    coalescer = stage.coalescer()
    assert [await coalescer.call(f"r{i}", 1.0) for i in range(3)] == ["R0", "R1", "R2"]
    assert stage.calls == [["r0"], ["r1"], ["r2"]] and stage.observed == [1, 1, 1]


async def test_requests_arriving_during_a_call_go_out_together_when_it_returns() -> None:
    stage = FakeStage()
    coalescer = stage.coalescer()
    first = asyncio.ensure_future(coalescer.call("r0", 1.0))
    await _settle()
    rest = [asyncio.ensure_future(coalescer.call(f"r{i}", 1.0)) for i in range(1, 5)]
    await _settle()
    assert stage.calls == [["r0"]]  # the others wait: one call in flight at most
    stage.release.set()
    assert await asyncio.gather(first, *rest) == ["R0", "R1", "R2", "R3", "R4"]
    assert stage.calls == [["r0"], ["r1", "r2", "r3", "r4"]] and stage.observed == [1, 4]


async def test_one_bad_request_fails_alone_and_a_failed_call_fails_its_batch() -> None:
    stage = FakeStage()
    coalescer = stage.coalescer()
    first = asyncio.ensure_future(coalescer.call("r0", 1.0))
    await _settle()
    batch = [asyncio.ensure_future(coalescer.call(r, 1.0)) for r in ("r1", "bad2", "r3")]
    await _settle()
    stage.release.set()
    results = await asyncio.gather(first, *batch, return_exceptions=True)
    assert results[:2] == ["R0", "R1"] and results[3] == "R3"
    assert isinstance(results[2], grpc.aio.AioRpcError) and results[2].code() == grpc.StatusCode.NOT_FOUND
    assert results[2].details() == "bad2 unknown"

    stage.release.clear()
    first = asyncio.ensure_future(coalescer.call("r5", 1.0))
    await _settle()
    doomed = [asyncio.ensure_future(coalescer.call(r, 1.0)) for r in ("r6", "fail-all")]
    await _settle()
    stage.release.set()
    results = await asyncio.gather(first, *doomed, return_exceptions=True)
    assert results[0] == "R5"
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE for r in results[1:])


async def test_each_request_keeps_its_own_deadline_and_an_expired_one_is_never_sent() -> None:
    stage = FakeStage()
    coalescer = stage.coalescer()
    first = asyncio.ensure_future(coalescer.call("r0", 1.0))
    await _settle()
    hurried = asyncio.ensure_future(coalescer.call("hurried", 0.01))
    patient = asyncio.ensure_future(coalescer.call("patient", 1.0))
    with pytest.raises(asyncio.TimeoutError):
        await hurried  # still queued behind r0 when its 10 ms ran out
    stage.release.set()
    assert await asyncio.gather(first, patient) == ["R0", "PATIENT"]
    assert stage.calls == [["r0"], ["patient"]]  # alone on the single call: "hurried" was dropped


async def test_a_full_queue_goes_out_without_waiting_for_the_call_in_flight() -> None:
    stage = FakeStage()
    coalescer = stage.coalescer(max_batch=3)
    first = asyncio.ensure_future(coalescer.call("r0", 1.0))
    await _settle()
    queued = [asyncio.ensure_future(coalescer.call(f"r{i}", 1.0)) for i in range(1, 6)]
    await _settle()
    assert stage.calls == [["r0"], ["r1", "r2", "r3"]]  # cap reached: sent at once
    stage.release.set()
    assert await asyncio.gather(first, *queued) == ["R0", "R1", "R2", "R3", "R4", "R5"]
    assert stage.calls[2] == ["r4", "r5"]


async def test_a_batch_is_one_span_linked_both_ways_with_each_requests_wait(monkeypatch) -> None:  # noqa: ANN001
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(coalescing, "tracer", lambda: tracer)
    stage = FakeStage()
    coalescer = stage.coalescer()

    async def request(name: str) -> str:
        with tracer.start_as_current_span(f"Recommend {name}"):
            return await coalescer.call(name, 1.0)

    first = asyncio.ensure_future(request("r0"))
    await _settle()
    members = [asyncio.ensure_future(request(f"r{i}")) for i in (1, 2)]
    await _settle()
    stage.release.set()
    await asyncio.gather(first, *members)
    spans = {s.name: s for s in memory.get_finished_spans() if s.name.startswith("Recommend")}
    waits = [s for s in memory.get_finished_spans() if s.name == coalescing.SPAN_GATEWAY_COALESCED]
    (batch,) = [s for s in memory.get_finished_spans() if s.name == coalescing.SPAN_GATEWAY_BATCH]
    assert len(waits) == 2  # r1 and r2 waited; r0 went alone and has no wait span
    assert {w.parent.span_id for w in waits} == {
        spans["Recommend r1"].context.span_id,
        spans["Recommend r2"].context.span_id,
    }
    assert batch.parent.span_id == waits[0].context.span_id or batch.parent.span_id == waits[1].context.span_id
    assert {link.context.span_id for link in batch.links} == {w.context.span_id for w in waits}
    for wait in waits:
        assert [link.context.span_id for link in wait.links] == [batch.context.span_id]
        assert wait.attributes["infermesh.batch.requests"] == 2 and wait.attributes["infermesh.coalesce.wait_ms"] >= 0
    assert batch.attributes["infermesh.batch.requests"] == 2 and batch.attributes["infermesh.stage"] == "features"
    assert not trace.get_current_span().is_recording()  # the batch's context was detached


def _infer_request(rows: np.ndarray) -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name="ranker", model_version="1")
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name="score")
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


def test_scoring_rows_concatenate_and_scores_split_back_by_request() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.random((n, 64), dtype=np.float32) for n in (3, 1, 5)]
    combined, rows = concatenate_rows([_infer_request(p) for p in parts])
    assert rows == [3, 1, 5] and list(combined.inputs[0].shape) == [9, 64]
    assert combined.raw_input_contents[0] == np.concatenate(parts).astype("<f4").tobytes()
    assert [o.name for o in combined.outputs] == ["score"]
    scores = np.arange(9, dtype="<f4")
    reply = inference_pb2.ModelInferResponse(model_name="ranker", model_version="1")
    reply.outputs.add(name="score", datatype="FP32", shape=[9, 1])
    reply.raw_output_contents.append(scores.tobytes())
    split = split_scores(reply, rows)
    assert [np.frombuffer(r.raw_output_contents[0], "<f4").tolist() for r in split] == [[0, 1, 2], [3], [4, 5, 6, 7, 8]]
    assert [list(r.outputs[0].shape) for r in split] == [[3, 1], [1, 1], [5, 1]]
    assert all(r.model_version == "1" for r in split)
    reply.raw_output_contents[0] = scores.tobytes()[:-2]  # not a whole number of bytes per row
    assert all(
        isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INTERNAL for r in split_scores(reply, rows)
    )


async def test_a_batch_stops_before_its_summed_size_passes_the_cap() -> None:
    stage = FakeStage()
    coalescer = Coalescer(
        "scoring",
        stage.single,
        stage.batch,
        max_batch=8,
        max_in_flight=1,
        size=len,
        max_size=6,
    )
    first = asyncio.ensure_future(coalescer.call("r0", 1.0))
    await _settle()
    queued = [asyncio.ensure_future(coalescer.call(r, 1.0)) for r in ("aaa", "bbb", "c", "dddddddd")]
    await _settle()
    stage.release.set()
    assert await asyncio.gather(first, *queued) == ["R0", "AAA", "BBB", "C", "DDDDDDDD"]
    # 3 + 3 rows fill the first batch; "c" starts the next; 8 rows alone exceed the cap and go alone.
    assert stage.calls == [["r0"], ["aaa", "bbb"], ["c"], ["dddddddd"]]


class FakeScoring:
    """ModelInfer that refuses more than 4 rows in one call, like a model's max_batch_size."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = asyncio.Event()

    async def ModelInfer(
        self, request: inference_pb2.ModelInferRequest, timeout: float
    ) -> inference_pb2.ModelInferResponse:  # noqa: N802
        rows = request.inputs[0].shape[0]
        self.calls.append(rows)
        await self.release.wait()
        if rows > 4:
            raise rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"batch of {rows} rows exceeds max_batch_size 4")
        values = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(rows, -1)[:, 0]
        reply = inference_pb2.ModelInferResponse(model_name="ranker", model_version="1")
        reply.outputs.add(name="score", datatype="FP32", shape=[rows, 1])
        reply.raw_output_contents.append(values.astype("<f4").tobytes())
        return reply


async def test_rows_the_model_refuses_together_are_scored_request_by_request() -> None:
    from gateway.stage_calls import CoalescedCalls

    scoring = FakeScoring()
    stubs = type("Stubs", (), {"features": None, "ranking": None, "scoring": scoring})()
    calls = CoalescedCalls(stubs, max_batch=8, max_in_flight=1, max_rows=100)
    parts = [np.full((n, 2), float(n), dtype=np.float32) for n in (1, 3, 2)]
    first = asyncio.ensure_future(calls.score(_infer_request(parts[0]), 1.0))
    await _settle()
    rest = [asyncio.ensure_future(calls.score(_infer_request(p), 1.0)) for p in parts[1:]]
    await _settle()
    scoring.release.set()
    replies = await asyncio.gather(first, *rest)
    assert [np.frombuffer(r.raw_output_contents[0], "<f4").tolist() for r in replies] == [[1.0], [3.0] * 3, [2.0] * 2]
    assert scoring.calls == [1, 5, 3, 2]  # 3 + 2 rows refused together, then each alone


async def test_a_stuck_call_does_not_hold_the_queue_past_max_wait() -> None:
    stage = FakeStage()
    coalescer = Coalescer("features", stage.single, stage.batch, max_batch=8, max_in_flight=1, max_wait=0.02)
    stuck = asyncio.ensure_future(coalescer.call("r0", 5.0))
    await _settle()
    queued = [asyncio.ensure_future(coalescer.call(f"r{i}", 5.0)) for i in (1, 2)]
    await _settle()
    assert stage.calls == [["r0"]]
    await asyncio.sleep(0.05)  # r0's call has been out for longer than max_wait
    assert stage.calls == [["r0"], ["r1", "r2"]]  # the queue went without waiting for r0
    stage.release.set()
    assert await asyncio.gather(stuck, *queued) == ["R0", "R1", "R2"]


async def test_a_batch_nobody_waits_for_any_more_is_cancelled() -> None:
    stage = FakeStage()
    stage.batch_release = asyncio.Event()  # batched calls hang until the test says
    coalescer = stage.coalescer()
    first = asyncio.ensure_future(coalescer.call("r0", 5.0))
    await _settle()
    quitters = [asyncio.ensure_future(coalescer.call(f"q{i}", 0.05)) for i in (1, 2)]
    stayer = asyncio.ensure_future(coalescer.call("s3", 5.0))
    await _settle()
    stage.release.set()  # r0 answers; q1, q2 and s3 go out as one batch behind it
    assert await first == "R0"
    await _settle()
    assert stage.calls[1] == ["q1", "q2", "s3"]
    (batch_task,) = coalescer._tasks
    stayer.cancel()  # s3's caller goes away; q1 and q2 run out of time
    for quitter in quitters:
        with pytest.raises(asyncio.TimeoutError):
            await quitter
    await _settle()
    assert batch_task.cancelled() or batch_task.done()
    assert coalescer._in_flight == 0  # the stage is free again
    assert await coalescer.call("r4", 1.0) == "R4"
