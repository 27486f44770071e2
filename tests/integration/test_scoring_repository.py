"""Model versions on disk through the real server: hot swaps under load, broken versions,
version policies, explicit load/unload. Real ONNX Runtime, real gRPC, real files."""

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
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from onnx import TensorProto, helper

from services.scoring import modelgen
from services.scoring.testing import running_scoring, server_settings
from services.workload.model import IR_VERSION, OPSET

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
        [helper.make_node("Constant", [], ["s"], value=shape), helper.make_node("Reshape", ["features", "s"], ["score"])],
        "picky",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["half", 128])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION).SerializeToString()


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
    modelgen.write_config(tmp_path, "ranker", {"max_batch_size": 64, "dynamic_batching": {"max_queue_delay_microseconds": 500}})
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
        await eventually(lambda: _index_is(stub, {"2": "READY", "3": "UNAVAILABLE", "4": "UNAVAILABLE"}), "3 and 4 rejected")
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
            pb.RepositoryModelLoadRequest(model_name="ranker", parameters={"config": pb.ModelRepositoryParameter(string_param=pinned)})
        )
        first = await stub.ModelInfer(infer_request(rows))
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="ranker", parameters={"config": pb.ModelRepositoryParameter(string_param="{}")})
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


async def _ready(value: bool) -> bool:
    return value


async def _server_ready(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    return (await stub.ServerReady(pb.ServerReadyRequest())).ready


async def _not_ready(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> bool:
    return not (await stub.ModelReady(pb.ModelReadyRequest(name=model))).ready


async def _index_is(stub: pb_grpc.GRPCInferenceServiceStub, states: dict[str, str]) -> bool:
    return {v: s for v, (s, _) in (await index(stub, "ranker")).items()} == states
