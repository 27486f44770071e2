"""The dynamic batcher through real gRPC and real ONNX Runtime: batches form under
concurrency, results equal unbatched inference exactly, statistics and metrics add up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from infermesh.workload import modelgen
from infermesh.workload.model import IR_VERSION, OPSET
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.runtime.metrics import exposition as exposition_of
from services.scoring import service as service_module
from services.scoring.service import ScoringService
from tests.scoring_server import running_scoring, server_settings

CLIENTS = 64
REQUESTS_PER_CLIENT = 12


def heavy_model(width: int = 1024, layers: int = 8) -> bytes:
    """A chain of square MatMuls: slow enough per request that a queue builds behind it."""
    weight = numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")
    nodes, previous = [], "x"
    for layer in range(layers):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"h{layer}"]))
        previous = f"h{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[weight],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    ).SerializeToString()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    modelgen.write_config(
        root,
        "ranker",
        {
            "max_batch_size": 1024,
            # Generous delay, dispatch at 64 rows: batch formation does not hinge on machine speed.
            "dynamic_batching": {"max_queue_delay_microseconds": 20_000, "preferred_batch_size": [64]},
        },
    )
    modelgen.write_version(root, "ranker", 1, modelgen.mlp_model(11))
    modelgen.write_config(
        root, "mixed", {"max_batch_size": 256, "dynamic_batching": {"max_queue_delay_microseconds": 5_000}}
    )
    modelgen.write_version(root, "mixed", 1, modelgen.mlp_model(12))
    modelgen.write_config(
        root, "heavy", {"max_batch_size": 256, "dynamic_batching": {"max_queue_size": 1}, "warmup": []}
    )
    modelgen.write_version(root, "heavy", 1, heavy_model())
    return root


@pytest.fixture(scope="module")
async def server(repository: Path) -> AsyncIterator[ScoringService]:
    async with running_scoring(server_settings(repository)) as service:
        yield service


@pytest.fixture(scope="module")
async def stub(server: ScoringService) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.settings.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def request_for(model: str, rows: np.ndarray, name: str = "features", datatype: str = "FP32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


def scores(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))


def local_session(repository: Path, model: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(repository / model / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )


async def statistics(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    (stats,) = reply.model_stats
    return stats


async def test_64_concurrent_single_row_clients_are_batched_and_exact(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path, server: ScoringService
) -> None:
    rows = np.random.default_rng(5).standard_normal((CLIENTS * REQUESTS_PER_CLIENT, 64)).astype(np.float32)

    async def client(index: int) -> list[np.ndarray]:
        answers = []
        for n in range(REQUESTS_PER_CLIENT):
            row = rows[index * REQUESTS_PER_CLIENT + n][None, :]
            answers.append(scores(await stub.ModelInfer(request_for("ranker", row), timeout=30)))
        return answers

    served = np.concatenate(
        [a for answers in await asyncio.gather(*(client(i) for i in range(CLIENTS))) for a in answers]
    )
    session = local_session(repository, "ranker")
    unbatched = np.concatenate([session.run(None, {"features": row[None, :]})[0] for row in rows])
    assert served.shape == (len(rows), 1)
    assert np.array_equal(served, unbatched)  # bit for bit

    stats = await statistics(stub, "ranker")
    mean_batch = stats.inference_count / stats.execution_count
    assert stats.inference_count == len(rows) and mean_batch > 8, (stats.inference_count, stats.execution_count)
    infer = stats.inference_stats
    assert infer.success.count == len(rows) and infer.fail.count == 0
    assert infer.queue.count == len(rows) and infer.compute_infer.count == len(rows)
    assert infer.queue.ns > 0 and infer.compute_infer.ns > 0 and stats.last_inference > 0
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == len(rows)
    assert stats.memory_usage[0].type == "CPU" and stats.memory_usage[0].byte_size > 0

    exposition = exposition_of(server.metrics.registry)[0].decode()
    labels = '{model="ranker",version="1"}'
    assert f"nv_inference_count{labels} {float(len(rows))}" in exposition
    assert f"nv_inference_exec_count{labels} {float(stats.execution_count)}" in exposition
    assert f"nv_inference_request_success{labels} {float(len(rows))}" in exposition
    assert f"scoring_batch_size_count{labels} {float(stats.execution_count)}" in exposition
    assert f"nv_inference_pending_request_count{labels} 0.0" in exposition
    assert (
        'scoring_model_info{io_binding="false",model="ranker",provider="CPUExecutionProvider",version="1"} 1.0'
        in exposition
    )


async def test_requests_of_different_sizes_are_split_back_exactly(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    rng = np.random.default_rng(9)
    batches = [rng.standard_normal((int(n), 64)).astype(np.float32) for n in rng.integers(1, 40, size=48)]
    replies = await asyncio.gather(*(stub.ModelInfer(request_for("mixed", b), timeout=30) for b in batches))
    session = local_session(repository, "mixed")
    for rows, reply in zip(batches, replies, strict=True):
        assert np.array_equal(scores(reply), session.run(None, {"features": rows})[0])
    stats = await statistics(stub, "mixed")
    assert stats.inference_count == sum(len(b) for b in batches)
    assert stats.execution_count < len(batches)  # some requests shared an execution


async def test_request_timeout_parameter_expires_in_the_queue_uncomputed(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    before = await statistics(stub, "mixed")
    request = request_for("mixed", np.ones((2, 64), np.float32))
    request.parameters["timeout"].int64_param = 1  # microseconds: gone before any batch forms
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "not computed" in raised.value.details()
    after = await statistics(stub, "mixed")
    assert after.inference_count == before.inference_count and after.execution_count == before.execution_count
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1


async def test_a_full_queue_answers_resource_exhausted(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rows = np.ones((256, 1024), np.float32)
    request = request_for("heavy", rows, name="x")
    outcomes = await asyncio.gather(*(stub.ModelInfer(request, timeout=60) for _ in range(8)), return_exceptions=True)
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    served = [o for o in outcomes if isinstance(o, pb.ModelInferResponse)]
    assert rejected and served
    assert {(e.code(), "queue is full" in e.details()) for e in rejected} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
    }
    assert all(
        np.array_equal(np.frombuffer(r.raw_output_contents[0], np.float32).reshape(256, 1024), rows) for r in served
    )


def reshaped(request: pb.ModelInferRequest) -> None:
    request.inputs[0].ClearField("shape")
    request.inputs[0].shape.extend([4, 32])  # same bytes, wrong shape


def text_priority(request: pb.ModelInferRequest) -> None:
    request.parameters["priority"].string_param = "high"


BAD_REQUESTS: list[tuple[Callable[[pb.ModelInferRequest], object], grpc.StatusCode, str]] = [
    (reshaped, grpc.StatusCode.INVALID_ARGUMENT, "the model expects [-1, 64]"),
    (
        lambda r: setattr(r.inputs[0], "datatype", "FP64"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not match the model's FP32",
    ),
    (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), grpc.StatusCode.INVALID_ARGUMENT, "needs 512"),
    (lambda r: setattr(r.inputs[0], "name", "feature"), grpc.StatusCode.INVALID_ARGUMENT, "has no input 'feature'"),
    (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no ready version '7'"),
    (lambda r: r.outputs.add(name="logits"), grpc.StatusCode.INVALID_ARGUMENT, "has no output 'logits'"),
    (text_priority, grpc.StatusCode.INVALID_ARGUMENT, "'priority' must be a non-negative integer"),
]


@pytest.mark.parametrize(("mutate", "code", "phrase"), BAD_REQUESTS)
async def test_bad_requests_get_the_right_status(
    stub: pb_grpc.GRPCInferenceServiceStub,
    mutate: Callable[[pb.ModelInferRequest], object],
    code: grpc.StatusCode,
    phrase: str,
) -> None:
    request = request_for("mixed", np.ones((2, 64), np.float32))
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request, timeout=10)
    assert raised.value.code() == code and phrase in raised.value.details(), raised.value.details()


async def test_too_many_rows_for_max_batch_size(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ModelInfer(request_for("mixed", np.ones((257, 64), np.float32)), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds max_batch_size 256" in raised.value.details()


async def stream_answers(
    stub: pb_grpc.GRPCInferenceServiceStub, requests: list[pb.ModelInferRequest]
) -> dict[str, pb.ModelStreamInferResponse]:
    """Every request sent on one ModelStreamInfer stream at once; the answers by request id."""

    async def send() -> AsyncIterator[pb.ModelInferRequest]:
        for request in requests:
            yield request

    return {answer.infer_response.id: answer async for answer in stub.ModelStreamInfer(send(), timeout=60)}


async def test_a_stream_of_single_rows_is_batched_and_exact(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    rows = np.random.default_rng(17).standard_normal((96, 64)).astype(np.float32)
    requests = []
    for number, row in enumerate(rows):
        request = request_for("mixed", row[None, :])
        request.id = f"r{number}"
        requests.append(request)
    before = await statistics(stub, "mixed")
    answers = await stream_answers(stub, requests)
    after = await statistics(stub, "mixed")

    session = local_session(repository, "mixed")
    assert sorted(answers) == sorted(r.id for r in requests)
    for number, row in enumerate(rows):
        answer = answers[f"r{number}"]
        assert answer.error_message == ""
        assert np.array_equal(scores(answer.infer_response), session.run(None, {"features": row[None, :]})[0])
    assert after.inference_count - before.inference_count == len(rows)
    assert after.execution_count - before.execution_count < len(rows)  # the stream's requests shared executions
    assert after.inference_stats.success.count - before.inference_stats.success.count == len(rows)


async def test_a_failed_request_on_a_stream_is_answered_and_the_stream_goes_on(
    stub: pb_grpc.GRPCInferenceServiceStub, repository: Path
) -> None:
    good = request_for("mixed", np.ones((2, 64), np.float32))
    good.id = "good"
    unknown = request_for("nope", np.ones((2, 64), np.float32))
    unknown.id = "unknown"
    wrong = request_for("mixed", np.ones((2, 64), np.float32))
    wrong.id = "wrong"
    reshaped(wrong)
    later = request_for("mixed", np.full((3, 64), 0.5, np.float32))
    later.id = "later"
    answers = await stream_answers(stub, [good, unknown, wrong, later])
    assert answers["unknown"].error_message.startswith("unknown model 'nope'")
    assert answers["unknown"].infer_response.model_name == "nope"
    assert "the model expects [-1, 64]" in answers["wrong"].error_message
    session = local_session(repository, "mixed")
    for request in (good, later):
        answer = answers[request.id]
        assert answer.error_message == "" and answer.infer_response.model_version == "1"
        rows = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(list(request.inputs[0].shape))
        assert np.array_equal(scores(answer.infer_response), session.run(None, {"features": rows})[0])


async def test_an_unexpected_failure_on_a_stream_is_hidden_and_the_stream_goes_on(
    stub: pb_grpc.GRPCInferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = service_module._encode

    def failing_encode(model: object, request: pb.ModelInferRequest, *rest: object) -> pb.ModelInferResponse:
        if request.id == "boom":
            raise RuntimeError("a bug with private details")
        return encode(model, request, *rest)

    monkeypatch.setattr(service_module, "_encode", failing_encode)
    requests = []
    for name in ("before", "boom", "after"):
        request = request_for("mixed", np.ones((1, 64), np.float32))
        request.id = name
        requests.append(request)
    answers = await stream_answers(stub, requests)
    assert answers["boom"].error_message == "internal error; the service log has the details"
    assert answers["before"].error_message == answers["after"].error_message == ""
    assert scores(answers["after"].infer_response).shape == (1, 1)


async def test_a_stream_holds_the_client_back_instead_of_overflowing_the_queue(
    stub: pb_grpc.GRPCInferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "heavy" queues one request at most: 8 concurrent unary calls get RESOURCE_EXHAUSTED
    # (test above). With two of a stream's requests in flight (one computing, one queued)
    # the server reads the rest only as answers go out, so every one is served.
    monkeypatch.setattr("services.scoring.service.STREAM_IN_FLIGHT", 2)
    rows = np.ones((256, 1024), np.float32)
    requests = []
    for number in range(6):
        request = request_for("heavy", rows, name="x")
        request.id = str(number)
        requests.append(request)
    answers = await stream_answers(stub, requests)
    assert sorted(answers) == [str(n) for n in range(6)]
    assert [a.error_message for a in answers.values()] == [""] * 6
    assert all(np.array_equal(scores(a.infer_response), rows) for a in answers.values())
