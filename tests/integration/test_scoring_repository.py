"""Model versions on disk through the real server: hot swaps under load, broken versions,
version policies, explicit load/unload, the memory budget. Real ONNX Runtime, real gRPC,
real files."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from infermesh.workload import modelgen
from infermesh.workload.model import IR_VERSION, OPSET, MlpWeights, build_onnx
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.runtime.metrics import exposition as exposition_of
from services.scoring.repository import BUDGET_VARIABLE, EVICTED
from services.scoring.service import ScoringService
from tests.scoring_server import running_scoring, server_settings

WAIT_SECONDS = 60.0
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a condition (the repository polls in the background); fail naming `what` if it never holds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_SECONDS
    while not await check():
        if loop.time() > give_up:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def server_and_stub(repository: Path, **settings: Any) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with running_scoring(server_settings(repository, **settings)) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.settings.port}") as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer_request(rows: np.ndarray, model: str = "ranker", version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


def scores(reply: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(-1, 1)


async def index(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> dict[str, tuple[str, str]]:
    reply = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    return {m.version: (m.state, m.reason) for m in reply.models if m.name == model}


def reference(seed: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(modelgen.mlp_model(seed), options, providers=["CPUExecutionProvider"])


def fails_on_small_batches() -> bytes:
    """Loads fine, but reshaping [N, 64] to [-1, 128] fails for odd N: a warmup of 1 row fails."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 128])
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["s"], value=shape),
            helper.make_node("Reshape", ["features", "s"], ["score"]),
        ],
        "picky",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["half", 128])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    ).SerializeToString()


@dataclass
class Load:
    """Clients calling ModelInfer back to back; every answer and every error is kept."""

    stub: pb_grpc.GRPCInferenceServiceStub
    answers: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    errors: list[grpc.aio.AioRpcError] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            rows = rng.standard_normal((int(rng.integers(1, 5)), 64)).astype(np.float32)
            try:
                reply = await self.stub.ModelInfer(infer_request(rows), timeout=30)
            except grpc.aio.AioRpcError as error:
                self.errors.append(error)
                continue
            self.answers.append((reply.model_version, rows, scores(reply)))

    def versions_since(self, start: int) -> set[str]:
        return {version for version, _, _ in self.answers[start:]}

    @asynccontextmanager
    async def running(self, clients: int = 6) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self.client(seed)) for seed in range(clients)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)


async def test_new_version_takes_traffic_under_load_and_broken_ones_never_do(tmp_path: Path) -> None:
    modelgen.write_config(
        tmp_path, "ranker", {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_microseconds": 500}}
    )
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(1))
    async with server_and_stub(tmp_path) as stub, Load(stub).running() as load:
        await eventually(lambda: _ready(len(load.answers) > 50), "traffic on version 1")
        modelgen.write_version(tmp_path, "ranker", 2, modelgen.mlp_model(2))
        await eventually(lambda: _ready("2" in load.versions_since(0)), "traffic reaching version 2")
        switched = len(load.answers)
        await eventually(lambda: _ready(len(load.answers) > switched + 100), "more traffic")
        await eventually(lambda: _index_is(stub, {"2": "READY"}), "version 1 unloaded")
        assert load.versions_since(switched + 50) == {"2"}  # in-flight v1 answers done by then

        modelgen.write_version(tmp_path, "ranker", 3, modelgen.CORRUPT_MODEL)
        (tmp_path / "ranker" / "4").mkdir()
        (tmp_path / "ranker" / "4" / "model.onnx").write_bytes(fails_on_small_batches())
        await eventually(
            lambda: _index_is(stub, {"2": "READY", "3": "UNAVAILABLE", "4": "UNAVAILABLE"}), "3 and 4 rejected"
        )
        rejected_at = len(load.answers)
        await eventually(lambda: _ready(len(load.answers) > rejected_at + 100), "traffic after the rejections")
        states = await index(stub, "ranker")
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="ranker", version="3"))).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="ranker"))).ready
    assert load.errors == []
    assert load.versions_since(rejected_at) == {"2"}
    assert "onnxruntime cannot load it" in states["3"][1]
    assert "warmup request 0 (batch 1) failed" in states["4"][1]
    models = {"1": reference(1), "2": reference(2)}
    for version, rows, served in load.answers:  # each answer is exactly its version's output
        assert np.array_equal(served, models[version].run(None, {"features": rows})[0])


async def test_latest_two_versions_serve_side_by_side(tmp_path: Path) -> None:
    modelgen.write_config(tmp_path, "ranker", {"max_batch_size": 8, "version_policy": {"latest": {"num_versions": 2}}})
    for version in (1, 2, 3):
        modelgen.write_version(tmp_path, "ranker", version, modelgen.mlp_model(version))
    rows = np.ones((2, 64), np.float32)
    async with server_and_stub(tmp_path) as stub:
        assert await index(stub, "ranker") == {
            "2": ("READY", "CPUExecutionProvider: CPU requested"),
            "3": ("READY", "CPUExecutionProvider: CPU requested"),
        }
        default = await stub.ModelInfer(infer_request(rows))
        pinned = await stub.ModelInfer(infer_request(rows, version="2"))
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="ranker"))
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="ranker"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(rows, version="1"))
    assert (default.model_version, pinned.model_version) == ("3", "2")
    assert np.array_equal(scores(pinned), reference(2).run(None, {"features": rows})[0])
    assert list(metadata.versions) == ["2", "3"]
    assert [(s.version, s.inference_count) for s in stats.model_stats] == [("2", 2), ("3", 2)]
    assert raised.value.code() == NOT_FOUND and "no ready version '1'" in raised.value.details()


async def test_bad_config_keeps_the_loaded_versions_serving(tmp_path: Path) -> None:
    modelgen.write_config(tmp_path, "ranker", {"max_batch_size": 8})
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(1))
    rows = np.ones((1, 64), np.float32)
    async with server_and_stub(tmp_path) as stub:
        (tmp_path / "ranker" / "config.json").write_text('{"max_batch_size": 8, "dynamic_batchin": {}}')
        await eventually(lambda: _index_is(stub, {"1": "READY", "": "UNAVAILABLE"}), "config error reported")
        reason = (await index(stub, "ranker"))[""][1]
        served = await stub.ModelInfer(infer_request(rows))
        # A fixed config reloads the model with it (here: batching turned off).
        modelgen.write_config(tmp_path, "ranker", {"max_batch_size": 8, "dynamic_batching": None, "warmup": []})
        await eventually(lambda: _index_is(stub, {"1": "READY"}), "config accepted again")
        after = await stub.ModelInfer(infer_request(rows))
    assert "unknown keys ['dynamic_batchin']" in reason
    assert served.model_version == after.model_version == "1"


async def test_a_repository_with_only_a_broken_model_is_not_ready(tmp_path: Path) -> None:
    modelgen.write_version(tmp_path, "broken", 1, modelgen.CORRUPT_MODEL)
    async with server_and_stub(tmp_path) as stub:
        ready = await stub.ServerReady(pb.ServerReadyRequest())
        states = await index(stub, "broken")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(infer_request(np.ones((1, 64), np.float32), model="broken"))
        # The fix is picked up by polling: a good file under a new version.
        modelgen.write_version(tmp_path, "broken", 2, modelgen.mlp_model(1))
        await eventually(lambda: _server_ready(stub), "ready after the fix")
    assert not ready.ready and states["1"][0] == "UNAVAILABLE"
    assert raised.value.code() == NOT_FOUND and "onnxruntime cannot load it" in raised.value.details()


async def test_explicit_mode_loads_and_unloads_on_request(tmp_path: Path) -> None:
    modelgen.write_config(tmp_path, "ranker", {"max_batch_size": 8})
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(1))
    modelgen.write_version(tmp_path, "ranker", 2, modelgen.mlp_model(2))
    modelgen.write_version(tmp_path, "broken", 1, modelgen.CORRUPT_MODEL)
    rows = np.ones((1, 64), np.float32)
    async with server_and_stub(tmp_path, model_control_mode="explicit") as stub:
        before = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        with pytest.raises(grpc.aio.AioRpcError) as not_loaded:
            await stub.ModelInfer(infer_request(rows))
        pinned = '{"max_batch_size": 8, "version_policy": {"specific": {"versions": [1]}}}'
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(
                model_name="ranker", parameters={"config": pb.ModelRepositoryParameter(string_param=pinned)}
            )
        )
        first = await stub.ModelInfer(infer_request(rows))
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(
                model_name="ranker", parameters={"config": pb.ModelRepositoryParameter(string_param="{}")}
            )
        )
        # In flight across the unload: each request that got in is answered.
        inflight = [asyncio.ensure_future(stub.ModelInfer(infer_request(rows), timeout=10)) for _ in range(20)]
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="ranker"))
        outcomes = await asyncio.gather(*inflight, return_exceptions=True)
        with pytest.raises(grpc.aio.AioRpcError) as unloaded:
            await stub.ModelInfer(infer_request(rows))
        after = await index(stub, "ranker")
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nothing"))
    assert {(m.name, m.state) for m in before.models} == {("broken", ""), ("ranker", "")}
    assert not_loaded.value.code() == NOT_FOUND
    assert first.model_version == "1"
    assert {o.model_version for o in outcomes if isinstance(o, pb.ModelInferResponse)} <= {"2"}
    assert {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} <= {NOT_FOUND}
    assert unloaded.value.code() == NOT_FOUND and "unloaded" in unloaded.value.details()
    assert after == {"": ("UNAVAILABLE", "unloaded")}
    assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version 1:" in broken.value.details()
    assert missing.value.code() == NOT_FOUND


async def test_poll_mode_refuses_unload_and_follows_removed_directories(tmp_path: Path) -> None:
    modelgen.write_version(tmp_path, "ranker", 1, modelgen.mlp_model(1))
    modelgen.write_version(tmp_path, "other", 1, modelgen.mlp_model(2))
    modelgen.write_version(tmp_path, "broken", 1, modelgen.CORRUPT_MODEL)
    async with server_and_stub(tmp_path) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="ranker"))
        assert not await _server_ready(stub)  # strict: the broken model has no ready version
        shutil.rmtree(tmp_path / "other")
        shutil.rmtree(tmp_path / "broken")
        await eventually(lambda: _not_ready(stub, "other"), "removed model unloaded")
        await eventually(lambda: _server_ready(stub), "ready once the broken model is gone")
        listed = {m.name for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models}
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="ranker"))).ready
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert listed == {"ranker"}


# ---------------------------------------------------------------------- memory budget

MODEL_BYTES = len(modelgen.mlp_model(1))  # every seed's file has the same size
TWO_AND_A_HALF = MODEL_BYTES * 5 // 2  # room for two models of one instance, not three


def large_model() -> bytes:
    """Same inputs and outputs as the ranker, about four times its file."""
    rng = np.random.default_rng(7)
    weights = MlpWeights(
        w1=rng.standard_normal((64, 1024)).astype(np.float32) * 0.1,
        b1=np.zeros(1024, np.float32),
        w2=rng.standard_normal((1024, 128)).astype(np.float32) * 0.03,
        b2=np.zeros(128, np.float32),
        w3=rng.standard_normal((128, 1)).astype(np.float32) * 0.1,
        b3=np.zeros(1, np.float32),
    )
    return build_onnx(weights).SerializeToString()


def write_models(repository: Path, names: str, **config: Any) -> None:
    for seed, name in enumerate(names.split(","), start=1):
        modelgen.write_config(repository, name, {"max_batch_size": 8, **config})
        modelgen.write_version(repository, name, 1, modelgen.mlp_model(seed))


@asynccontextmanager
async def budgeted(
    repository: Path, budget: int, **settings: Any
) -> AsyncIterator[tuple[ScoringService, pb_grpc.GRPCInferenceServiceStub]]:
    """A server with SCORING_MODEL_MEMORY_BUDGET_BYTES = `budget`."""
    async with running_scoring(server_settings(repository, model_memory_budget_bytes=budget, **settings)) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.settings.port}") as channel:
            yield service, pb_grpc.GRPCInferenceServiceStub(channel)


async def states(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[str, dict[str, tuple[str, str]]]:
    reply = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5)
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for model in reply.models:
        found.setdefault(model.name, {})[model.version] = (model.state, model.reason)
    return found


def exposition(service: ScoringService) -> str:
    return exposition_of(service.metrics.registry)[0].decode()


def evictions(text: str) -> dict[str, float]:
    """{model: evictions} from scoring_model_evictions_total."""
    found = {}
    for line in text.splitlines():
        if line.startswith("scoring_model_evictions_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('model="')[1].split('"')[0]] = float(value)
    return found


async def test_memory_budget_unloads_the_least_recently_used_model(tmp_path: Path) -> None:
    write_models(tmp_path, "a,b,c")
    rows = np.ones((2, 64), np.float32)
    async with budgeted(tmp_path, TWO_AND_A_HALF, model_control_mode="explicit", load_models="a,b") as (
        service,
        stub,
    ):
        before = await states(stub)
        await stub.ModelInfer(infer_request(rows, model="a"))  # a is now more recent than b
        # Probes resolve without leasing: they do not make b recent.
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="b"))).ready
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="b"))
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="c"))
        after_c = await states(stub)
        with pytest.raises(grpc.aio.AioRpcError) as evicted:
            await stub.ModelInfer(infer_request(rows, model="b"))
        ready_after_c = await _server_ready(stub)
        metrics_after_c = exposition(service)

        await stub.ModelInfer(infer_request(rows, model="c"))
        served_a = await stub.ModelInfer(infer_request(rows, model="a"))  # now c is the least recent
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="b"))  # b comes back on request
        served_b = await stub.ModelInfer(infer_request(rows, model="b"))
        after_b = await states(stub)
        metrics_after_b = exposition(service)
    assert {name: set(versions) for name, versions in before.items()} == {"a": {"1"}, "b": {"1"}, "c": {""}}
    assert after_c["a"]["1"][0] == after_c["c"]["1"][0] == "READY"
    state, reason = after_c["b"][""]
    assert state == "UNAVAILABLE" and reason.startswith(EVICTED) and "for 'c' version 1" in reason, reason
    assert evicted.value.code() == NOT_FOUND and EVICTED in evicted.value.details()
    assert ready_after_c  # an evicted model does not hold up readiness
    assert evictions(metrics_after_c) == {"b": 1.0}
    assert f"scoring_model_memory_bytes {float(2 * MODEL_BYTES)}" in metrics_after_c
    assert f"scoring_model_memory_budget_bytes {float(TWO_AND_A_HALF)}" in metrics_after_c

    assert np.array_equal(scores(served_a), reference(1).run(None, {"features": rows})[0])
    assert np.array_equal(scores(served_b), reference(2).run(None, {"features": rows})[0])
    assert after_b["a"]["1"][0] == after_b["b"]["1"][0] == "READY"
    assert after_b["c"][""][0] == "UNAVAILABLE" and after_b["c"][""][1].startswith(EVICTED)
    assert evictions(metrics_after_b) == {"b": 1.0, "c": 1.0}
    assert f"scoring_model_memory_bytes {float(2 * MODEL_BYTES)}" in metrics_after_b


async def test_memory_budget_never_evicts_a_model_with_requests_in_flight(tmp_path: Path) -> None:
    # a holds a lone row in its queue for 5 s, hoping for more: a request in flight.
    write_models(tmp_path, "a", dynamic_batching={"max_queue_delay_microseconds": 5_000_000})
    write_models(tmp_path, "b")
    modelgen.write_version(tmp_path, "c", 1, modelgen.mlp_model(3))
    rows = np.ones((1, 64), np.float32)
    async with budgeted(tmp_path, TWO_AND_A_HALF, model_control_mode="explicit", load_models="a,b") as (
        service,
        stub,
    ):
        slow = asyncio.ensure_future(stub.ModelInfer(infer_request(rows, model="a"), timeout=30))
        await eventually(lambda: _ready(service.repository.resolve("a").in_flight == 1), "a request in flight on a")
        await stub.ModelInfer(infer_request(rows, model="b"))  # b is more recent, but a is busy
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="c"))
        still_in_flight = service.repository.resolve("a").in_flight
        after = await states(stub)
        answered = await slow
    assert still_in_flight == 1, "the request on a was answered before c loaded: the test proves nothing"
    assert after["a"]["1"][0] == after["c"]["1"][0] == "READY"
    assert after["b"][""][0] == "UNAVAILABLE" and after["b"][""][1].startswith(EVICTED)
    assert answered.model_name == "a" and np.array_equal(
        scores(answered), reference(1).run(None, {"features": rows})[0]
    )


async def test_a_version_larger_than_the_budget_fails_to_load_and_evicts_nothing(tmp_path: Path) -> None:
    write_models(tmp_path, "a,b")
    # Three instances of the ranker: more than the whole budget on its own.
    write_models(tmp_path, "wide", instance_count=3)
    rows = np.ones((1, 64), np.float32)
    async with budgeted(tmp_path, TWO_AND_A_HALF, model_control_mode="explicit", load_models="a,b") as (
        service,
        stub,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="wide"))
        after = await states(stub)
        served = await stub.ModelInfer(infer_request(rows, model="a"))
        text = exposition(service)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the whole budget" in refused.value.details() and BUDGET_VARIABLE in refused.value.details()
    state, reason = after["wide"]["1"]
    assert state == "UNAVAILABLE" and f"about {3 * MODEL_BYTES} bytes" in reason and "3 instance(s)" in reason, reason
    assert after["a"]["1"][0] == after["b"]["1"][0] == "READY"
    assert served.model_version == "1"
    assert evictions(text) == {}


async def test_memory_budget_in_poll_mode(tmp_path: Path) -> None:
    write_models(tmp_path, "a,b,c")
    rows = np.ones((1, 64), np.float32)
    async with budgeted(tmp_path, TWO_AND_A_HALF) as (service, stub):
        # At start a, b and c load in name order; c pushed out a, loaded first and unused since.
        started = await states(stub)
        ready = await _server_ready(stub)
        await asyncio.sleep(0.5)  # five polls: the evicted model stays unloaded, nothing thrashes
        polled = await states(stub)
        # A too-large new version of b is refused; b's version 1 keeps serving, c stays.
        modelgen.write_version(tmp_path, "b", 2, large_model())
        await eventually(lambda: _ready("2" in polled_b(service)), "b version 2 refused")
        after_large = await states(stub)
        served_b = await stub.ModelInfer(infer_request(rows, model="b"))  # b is now more recent than c
        # A reload that cannot fit leaves a evicted, and the server ready.
        wide = pb.ModelRepositoryParameter(string_param='{"max_batch_size": 8, "instance_count": 3}')
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="a", parameters={"config": wide}))
        refused_states = await states(stub)
        ready_after_refusal = await _server_ready(stub)
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="a"))  # allowed in poll mode
        await asyncio.sleep(0.3)
        reloaded = await states(stub)
        text = exposition(service)
    assert ready
    assert started == polled
    assert started["a"][""][0] == "UNAVAILABLE" and started["a"][""][1].startswith(EVICTED)
    assert started["b"]["1"][0] == started["c"]["1"][0] == "READY"
    assert after_large["b"]["1"][0] == "READY" and after_large["c"]["1"][0] == "READY"
    assert after_large["b"]["2"][0] == "UNAVAILABLE" and "more than the whole budget" in after_large["b"]["2"][1]
    assert served_b.model_version == "1"
    assert (
        refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "more than the whole budget" in refused.value.details()
    )
    assert ready_after_refusal
    assert refused_states["a"]["1"][0] == "UNAVAILABLE" and "memory budget" in refused_states["a"]["1"][1]
    assert refused_states["a"][""][0] == "UNAVAILABLE" and refused_states["a"][""][1].startswith(EVICTED)
    assert reloaded["a"]["1"][0] == reloaded["b"]["1"][0] == "READY"
    assert reloaded["c"][""][0] == "UNAVAILABLE" and reloaded["c"][""][1].startswith(EVICTED)
    assert evictions(text) == {"a": 1.0, "c": 1.0}


def polled_b(service: ScoringService) -> dict[str, str]:
    return {
        row.version: row.state for row in service.repository.index() if row.name == "b" and row.state == "UNAVAILABLE"
    }


async def _ready(value: bool) -> bool:
    return value


async def _server_ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    return (await stub.ServerReady(pb.ServerReadyRequest())).ready


async def _not_ready(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> bool:
    return not (await stub.ModelReady(pb.ModelReadyRequest(name=model))).ready


async def _index_is(stub: pb_grpc.GRPCInferenceServiceStub, states: dict[str, str]) -> bool:
    return {v: s for v, (s, _) in (await index(stub, "ranker")).items()} == states
