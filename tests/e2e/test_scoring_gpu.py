"""Scoring on a GPU host: CUDA with IO binding, the TensorRT fallback, results matching CPU.

Skipped (with the reason) where onnxruntime has no CUDAExecutionProvider, e.g. the CPU-only
development machines; `pip install -e '.[gpu]'` on a GPU host runs them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from infermesh.workload import modelgen
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.scoring.providers import CUDA, TENSORRT, tensorrt_libraries_present
from services.scoring.service import PROVIDER_KEY, PROVIDER_REASON_KEY, ScoringService
from tests.scoring_server import running_scoring, server_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        CUDA not in ort.get_available_providers(),
        reason="needs an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider absent: "
        f"onnxruntime has {ort.get_available_providers()})",
    ),
]


@pytest.fixture(scope="module")
async def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ScoringService]:
    root = tmp_path_factory.mktemp("models")
    modelgen.write_config(
        root,
        "ranker",
        {
            "max_batch_size": 4096,
            "dynamic_batching": {"max_queue_delay_microseconds": 20_000, "preferred_batch_size": [64]},
            "instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0]}],
            "execution_providers": ["cuda"],
            "warmup": [{"batch_size": 256, "data": "random"}],
        },
    )
    modelgen.write_version(root, "ranker", 1, modelgen.mlp_model(1))
    modelgen.write_config(root, "trt", {"max_batch_size": 256, "execution_providers": ["tensorrt"]})
    modelgen.write_version(root, "trt", 1, modelgen.mlp_model(1))
    async with running_scoring(server_settings(root, providers="auto")) as service:
        yield service


@pytest.fixture(scope="module")
async def stub(gpu_server: ScoringService) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gpu_server.settings.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def request_for(model: str, rows: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


async def provider_of(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> tuple[str, str]:
    call = stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
    await call
    trailing = dict(await call.trailing_metadata())
    return trailing[PROVIDER_KEY], trailing[PROVIDER_REASON_KEY]


async def test_cuda_with_io_binding_serves_batches_matching_cpu(
    stub: pb_grpc.GRPCInferenceServiceStub, gpu_server: ScoringService
) -> None:
    provider, _ = await provider_of(stub, "ranker")
    assert provider == CUDA
    rows = np.random.default_rng(3).standard_normal((512, 64)).astype(np.float32)
    replies = await asyncio.gather(
        *(stub.ModelInfer(request_for("ranker", rows[i : i + 1]), timeout=60) for i in range(512))
    )
    served = np.concatenate([np.frombuffer(r.raw_output_contents[0], np.float32) for r in replies])
    cpu = ort.InferenceSession(modelgen.mlp_model(1), providers=["CPUExecutionProvider"]).run(None, {"features": rows})[
        0
    ]
    assert np.allclose(served, cpu[:, 0], atol=1e-4)

    (stats,) = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name="ranker"))).model_stats
    assert [(m.type, m.id) for m in stats.memory_usage] == [("GPU", 0)]
    assert stats.inference_count == 512 and stats.inference_count / stats.execution_count > 8
    exposition = generate_latest(gpu_server.metrics.registry).decode()
    assert f'scoring_model_info{{io_binding="true",model="ranker",provider="{CUDA}",version="1"}} 1.0' in exposition
    assert gpu_server.gpu_memory_metrics and "nv_gpu_memory_used_bytes{" in exposition  # the gpu extra has NVML


async def test_tensorrt_is_used_when_present_and_falls_back_to_cuda_when_not(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    provider, reason = await provider_of(stub, "trt")
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    (row,) = [m for m in index.models if m.name == "trt"]
    if tensorrt_libraries_present() and provider == TENSORRT:
        assert reason == f"{TENSORRT} was the first choice"
    else:
        assert provider == CUDA and "TensorrtExecutionProvider" in reason  # skipped or failed, and why
    assert row.reason.startswith(f"{provider}: ")
    reply = await stub.ModelInfer(request_for("trt", np.ones((4, 64), np.float32)), timeout=120)
    assert list(reply.outputs[0].shape) == [4, 1]
