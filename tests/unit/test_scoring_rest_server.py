"""The Open Inference Protocol's HTTP endpoints (services/scoring/rest/server.py) over a stand-in
servicer: routes, health answers, headers, the error table's statuses with {"error": ...}
bodies, the deadline Envoy sets and the trace context it sends. (The real servicer, behind
real Envoy, is tests/e2e/test_scoring_http.py's.)"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import (
    INTERNAL_ERROR_MESSAGE,
    MAX_DETAILS_BYTES,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)
from services.scoring.rest.server import InferenceHttpApi

FAILURES: dict[str, Exception] = {
    "nope": NotFound("unknown model 'nope'"),
    "busy": Overloaded("queue full"),
    "loading": Unavailable("model 'loading' has no ready version"),
    "slow": DeadlineExceeded("deadline exceeded in queue"),
    "bad": InvalidArgument("x" * 10_000),
    "boom": RuntimeError("a bug, with details nobody outside should see"),
}


class FakeCore:
    """Answers like InferenceServicer; remembers what each call was given."""

    def __init__(self) -> None:
        self.ready = True
        self.calls: list[tuple[str, Any, float | None]] = []
        self.trace_ids: list[int] = []

    def _record(self, method: str, request: Any, context: Any) -> None:
        self.calls.append((method, request, context.time_remaining()))
        self.trace_ids.append(trace.get_current_span().get_span_context().trace_id)
        name = getattr(request, "model_name", "") or getattr(request, "name", "")
        if name in FAILURES:
            raise FAILURES[name]

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == "ranker")

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="infermesh", version="0.1.0", extensions=["statistics"])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        self._record("ModelMetadata", request, context)
        context.set_trailing_metadata((("infermesh-execution-provider", "CPUExecutionProvider"),))
        return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="onnxruntime_onnx")

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        self._record("ModelInfer", request, context)
        # Echo: the first input back as output "y", doubled.
        doubled = np.frombuffer(request.raw_input_contents[0], "<f4") * 2
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=request.inputs[0].shape)
        response.raw_output_contents.append(doubled.astype("<f4").tobytes())
        return response


MAX_BODY = 64 * 1024


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient, FakeCore]]:
    core = FakeCore()
    client = TestClient(TestServer(InferenceHttpApi(core, MAX_BODY).application()))
    await client.start_server()
    try:
        yield client, core
    finally:
        await client.close()


def _infer_body(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, -2]}], **extra}


async def test_health_is_the_status_alone(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/ranker/ready",
        "/v2/models/ranker/versions/1/ready",
    ):
        reply = await client.get(path)
        assert (reply.status, await reply.read()) == (200, b""), path
    core.ready = False
    assert (await client.get("/v2/health/ready")).status == 400
    reply = await client.get("/v2/models/other/ready")
    assert (reply.status, await reply.read()) == (400, b"")


async def test_server_and_model_metadata(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    reply = await client.get("/v2")
    assert reply.status == 200 and reply.content_type == "application/json"
    assert await reply.json() == {
        "name": "infermesh",
        "version": "0.1.0",
        "extensions": ["statistics", "binary_tensor_data"],
    }
    reply = await client.get("/v2/models/ranker/versions/3")
    assert (await reply.json())["name"] == "ranker"
    assert reply.headers["infermesh-execution-provider"] == "CPUExecutionProvider"
    ((_, request, _),) = core.calls
    assert (request.name, request.version) == ("ranker", "3")


async def test_infer_with_json_tensors(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    reply = await client.post("/v2/models/ranker/infer", json=_infer_body(id="r1"))
    assert reply.status == 200 and reply.content_type == "application/json"
    assert "Inference-Header-Content-Length" not in reply.headers
    assert await reply.json() == {
        "model_name": "ranker",
        "model_version": "1",
        "id": "r1",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [3.0, -4.0]}],
    }
    ((_, request, remaining),) = core.calls
    assert request.model_version == "" and remaining is None  # no Envoy in between: no deadline


async def test_infer_with_binary_tensors(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    header = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + np.array([0.25, 4], "<f4").tobytes()
    reply = await client.post(
        "/v2/models/ranker/versions/1/infer",
        data=body,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert reply.status == 200 and reply.content_type == "application/octet-stream"
    payload = await reply.read()
    length = int(reply.headers["Inference-Header-Content-Length"])
    document = json.loads(payload[:length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(payload[length:], "<f4").tolist() == [0.5, 8.0]
    assert core.calls[0][1].model_version == "1"


async def test_response_compression_when_asked(served: tuple[TestClient, FakeCore]) -> None:
    client, _ = served
    reply = await client.post(
        "/v2/models/ranker/infer", json=_infer_body(), headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    )
    assert reply.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(await reply.read()))["outputs"][0]["data"] == [3.0, -4.0]


@pytest.mark.parametrize(
    ("model", "status"),
    [("nope", 404), ("busy", 429), ("loading", 503), ("slow", 504), ("bad", 400), ("boom", 500)],
)
async def test_errors_get_the_tables_status_and_an_error_body(
    served: tuple[TestClient, FakeCore], model: str, status: int
) -> None:
    client, _ = served
    reply = await client.post(f"/v2/models/{model}/infer", json=_infer_body())
    assert reply.status == status and reply.content_type == "application/json"
    (message,) = (await reply.json()).values()
    if model == "boom":
        assert message == INTERNAL_ERROR_MESSAGE
    else:
        assert len(message.encode()) <= MAX_DETAILS_BYTES
        assert message.startswith(str(FAILURES[model])[:40])


async def test_unknown_model_metadata_is_404(served: tuple[TestClient, FakeCore]) -> None:
    client, _ = served
    reply = await client.get("/v2/models/nope")
    assert reply.status == 404 and await reply.json() == {"error": "unknown model 'nope'"}


async def test_a_malformed_request_is_400_before_the_servicer(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    reply = await client.post("/v2/models/ranker/infer", data=b'{"inputs": [{"name": "x"}]}')
    assert reply.status == 400
    assert '"datatype" must be one of' in (await reply.json())["error"]
    assert core.calls == []


async def test_paths_and_methods_the_protocol_lacks(served: tuple[TestClient, FakeCore]) -> None:
    client, _ = served
    reply = await client.get("/v2/models/ranker/stats/" + "z" * 5000)
    assert reply.status == 404
    message = (await reply.json())["error"]
    assert message.startswith("no such endpoint") and "zzz" not in message
    reply = await client.get("/v2/models/ranker/infer")
    assert reply.status == 405 and (await reply.json())["error"] == "method 'GET' is not allowed here; use POST"


async def test_a_body_over_the_limit_is_413(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    reply = await client.post("/v2/models/ranker/infer", data=b" " * (MAX_BODY + 1))
    assert reply.status == 413
    assert (await reply.json())["error"] == f"the request body is over {MAX_BODY} bytes, the most this server takes"
    assert core.calls == []


async def test_the_deadline_envoy_sets_reaches_the_servicer(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    await client.post("/v2/models/ranker/infer", json=_infer_body(), headers={"x-envoy-expected-rq-timeout-ms": "1500"})
    remaining = core.calls[0][2]
    assert remaining is not None and 1.0 < remaining <= 1.5


async def test_the_callers_trace_continues(served: tuple[TestClient, FakeCore]) -> None:
    client, core = served
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    await client.post(
        "/v2/models/ranker/infer",
        json=_infer_body(),
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert core.trace_ids == [int(trace_id, 16)]
