"""The rendered config in the real Envoy binary: validation, then a live mesh of stub backends.

The live part starts small grpc.aio servers (each with a real grpc.health.v1 servicer),
renders a topology pointing at them with every Envoy port set to 0 (the kernel picks free
ones; the test reads them back from the admin API, so there is no port race), starts
Envoy and drives REST and gRPC through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from infermesh.envoy import bootstrap, process
from infermesh.envoy import cli as envoy_cli
from infermesh.envoy.http_filters import MAX_REQUEST_BYTES
from infermesh.envoy.resilience import EDGE_ROUTE_LIMITS, INTERNAL_ROUTE_LIMITS
from infermesh.envoy.tracing import Tracing
from services.genproto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.topology import (
    FEATURES,
    GATEWAY,
    RANKING,
    SCORING,
    SERVICES,
    Endpoint,
    MeshTopology,
    local_topology,
)
from tests.integration.envoy_harness import (
    DESCRIPTOR,
    REPO_ROOT,
    RPC_TIMEOUT_S,
    Backend,
    Envoy,
    all_healthy,
    health_flags,
    http_call,
    running_envoy,
    start_backend,
    until,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "replicas",
    [
        {},
        {GATEWAY: 1, FEATURES: 1, SCORING: 1, RANKING: 1},
        {GATEWAY: 2, FEATURES: 4, SCORING: 8, RANKING: 3},
    ],
)
def test_envoy_accepts_rendering(tmp_path: Path, replicas: dict[str, int]) -> None:
    topology = local_topology(replicas, descriptor_set=DESCRIPTOR)
    process.validate(bootstrap.write(topology, tmp_path / "envoy.json"))


def test_envoy_accepts_strict_dns_rendering(tmp_path: Path) -> None:
    topology = MeshTopology(
        replicas={name: (Endpoint("localhost", 50051),) for name in SERVICES},
        descriptor_set=DESCRIPTOR,
        listen_host="0.0.0.0",
        discovery="STRICT_DNS",
    )
    process.validate(bootstrap.write(topology, tmp_path / "envoy.json"))


def test_envoy_accepts_committed_local_config() -> None:
    # Relative descriptor path: resolves against the repo root, where `infermesh` runs.
    process.validate(REPO_ROOT / bootstrap.LOCAL_CONFIG, cwd=REPO_ROOT)


@pytest.mark.parametrize(
    ("endpoint", "sampling_percent"),
    [
        ("http://127.0.0.1:4317", 100.0),
        ("otel-collector:4317", 1.0),  # STRICT_DNS collector, as in Kubernetes
        ("https://localhost:4317", 0.0),  # TLS to the collector
    ],
)
def test_envoy_accepts_traced_rendering(tmp_path: Path, endpoint: str, sampling_percent: float) -> None:
    topology = local_topology({SCORING: 2}, descriptor_set=DESCRIPTOR)
    tracing = Tracing(endpoint, sampling_percent)
    process.validate(bootstrap.write(topology, tmp_path / "envoy.json", tracing))


def test_cli_render_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "envoy.json"
    args = ["render", "--replicas", "features=3", "--descriptor-set", str(DESCRIPTOR)]
    assert envoy_cli.main([*args, "--out", str(out), "--validate"]) == 0
    assert json.loads(out.read_text()) == json.loads(_stdout_of([*args, "--validate"], capsys))


def test_cli_render_validates_from_any_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As from a wheel install: no checkout around. The default names the installed files.
    monkeypatch.chdir(tmp_path)
    config = json.loads(_stdout_of(["render", "--validate"], capsys))
    assert str(DESCRIPTOR.resolve()) in json.dumps(config)


def _stdout_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert envoy_cli.main(argv) == 0
    return capsys.readouterr().out


def test_validate_reports_envoy_errors(tmp_path: Path) -> None:
    # The OpenAPI document Envoy also reads from the descriptor set's folder is there;
    # only the descriptor set is missing.
    (tmp_path / "openapi.json").write_bytes((DESCRIPTOR.parent / "openapi.json").read_bytes())
    topology = local_topology(descriptor_set=tmp_path / "missing.binpb")
    path = bootstrap.write(topology, tmp_path / "envoy.json")
    with pytest.raises(process.EnvoyError, match="missing.binpb"):
        process.validate(path)


# --------------------------------------------------------------------------- stub backends


class EchoGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Answers with one item per candidate; user "bad" gets INVALID_ARGUMENT."""

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        if request.user_id == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is bad")
        return gateway_pb2.RecommendResponse(
            items=[
                gateway_pb2.RecommendedItem(item_id=item, score=0.5, category=7)
                for item in request.candidate_ids[: request.k or 20]
            ],
            model_name=f"echo-{len(request.candidate_ids)}",
            model_version="1",
        )


class LiveScoring(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(
        self, request: grpc_predict_v2_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> grpc_predict_v2_pb2.ServerLiveResponse:
        return grpc_predict_v2_pb2.ServerLiveResponse(live=True)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[grpc_predict_v2_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[grpc_predict_v2_pb2.ModelStreamInferResponse]:
        async for request in requests:
            answer = grpc_predict_v2_pb2.ModelInferResponse(id=request.id, model_name=request.model_name)
            yield grpc_predict_v2_pb2.ModelStreamInferResponse(infer_response=answer)


@dataclass
class ReplicaFeatures(features_pb2_grpc.FeatureServiceServicer):
    """Says which replica answered, in the datatype field (the only free-form string)."""

    replica: int

    async def GetFeatures(
        self, request: features_pb2.GetFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.GetFeaturesResponse:
        matrix = features_pb2.DenseMatrix(datatype=f"replica-{self.replica}")
        return features_pb2.GetFeaturesResponse(model_input=matrix)


# --------------------------------------------------------------------------- envoy process


# --------------------------------------------------------------------------- the mesh


@dataclass
class Mesh:
    envoy: Envoy
    backends: dict[str, list[Backend]]

    async def all_healthy(self) -> bool:
        return await all_healthy(self.envoy, [(name, b.port) for name, group in self.backends.items() for b in group])


@pytest_asyncio.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    workdir = tmp_path_factory.mktemp("envoy-mesh")
    async with contextlib.AsyncExitStack() as stack:
        backends: dict[str, list[Backend]] = {}

        async def start(service: str, add: Callable[[grpc.aio.Server], None] | None) -> None:
            backend = await start_backend(service, add)
            stack.push_async_callback(backend.server.stop, None)
            backends.setdefault(service, []).append(backend)

        add_gateway = gateway_pb2_grpc.add_GatewayServiceServicer_to_server
        add_scoring = grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
        add_features = features_pb2_grpc.add_FeatureServiceServicer_to_server
        await start(GATEWAY, lambda server: add_gateway(EchoGateway(), server))
        await start(SCORING, lambda server: add_scoring(LiveScoring(), server))
        for replica in (0, 1):
            servicer = ReplicaFeatures(replica)
            await start(FEATURES, lambda server, s=servicer: add_features(s, server))
        await start(RANKING, None)  # health only: keeps the ranking cluster healthy

        replicas = [(name, b.port) for name, group in backends.items() for b in group]
        envoy = await stack.enter_async_context(running_envoy(workdir, replicas))
        mesh = Mesh(envoy, backends)
        yield mesh


@contextlib.asynccontextmanager
async def channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(address) as chan:
        yield chan


# --------------------------------------------------------------------------- live tests


async def test_grpc_recommend_via_edge(mesh: Mesh) -> None:
    async with channel(mesh.envoy.address("edge")) as chan:
        stub = gateway_pb2_grpc.GatewayServiceStub(chan)
        request = gateway_pb2.RecommendRequest(user_id="u1", candidate_ids=["i1", "i2", "i3"], k=2)
        response = await stub.Recommend(request, timeout=RPC_TIMEOUT_S)
    assert response.model_name == "echo-3"
    assert [item.item_id for item in response.items] == ["i1", "i2"]


async def test_grpc_error_passes_through_edge(mesh: Mesh) -> None:
    async with channel(mesh.envoy.address("edge")) as chan:
        stub = gateway_pb2_grpc.GatewayServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            request = gateway_pb2.RecommendRequest(user_id="bad")
            await stub.Recommend(request, timeout=RPC_TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "user_id is bad"


async def test_rest_recommend_is_transcoded(mesh: Mesh) -> None:
    body = json.dumps({"user_id": "u1", "candidate_ids": ["i1", "i2", "i3", "i4"], "k": 3})
    status, headers, raw = await http_call(
        mesh.envoy.address("edge"),
        "POST",
        "/v1/recommend",
        body.encode(),
        {"content-type": "application/json"},
    )
    assert status == 200, raw
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(raw)
    assert payload["model_name"] == "echo-4"
    assert [item["item_id"] for item in payload["items"]] == ["i1", "i2", "i3"]
    assert payload["items"][0] == {"item_id": "i1", "score": 0.5, "category": 7}
    # snake_case names, and defaults printed rather than omitted
    assert payload["unknown_items"] == 0
    assert payload["stage_timings"] == []
    assert "modelName" not in payload


async def test_rest_malformed_json_is_400(mesh: Mesh) -> None:
    status, _, raw = await http_call(
        mesh.envoy.address("edge"),
        "POST",
        "/v1/recommend",
        b'{"user_id": "u1", "candidate_ids": [',
        {"content-type": "application/json"},
    )
    assert status == 400, raw


async def test_rest_grpc_error_maps_to_http_status(mesh: Mesh) -> None:
    status, _, raw = await http_call(
        mesh.envoy.address("edge"),
        "POST",
        "/v1/recommend",
        json.dumps({"user_id": "bad", "candidate_ids": ["i1"]}).encode(),
        {"content-type": "application/json"},
    )
    assert status == 400, raw
    error = json.loads(raw)  # google.rpc.Status as JSON
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error["message"] == "user_id is bad"


async def test_rest_body_over_limit_is_413(mesh: Mesh) -> None:
    big = json.dumps({"user_id": "u1", "candidate_ids": ["i" * 1000] * 5000}).encode()
    assert len(big) > MAX_REQUEST_BYTES
    headers = {"content-type": "application/json"}
    edge = mesh.envoy.address("edge")
    status, _, _ = await http_call(edge, "POST", "/v1/recommend", big, headers)
    assert status == 413


async def test_inference_protocol_via_edge_reaches_scoring(mesh: Mesh) -> None:
    async with channel(mesh.envoy.address("edge")) as chan:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(chan)
        request = grpc_predict_v2_pb2.ServerLiveRequest()
        response = await stub.ServerLive(request, timeout=RPC_TIMEOUT_S)
    assert response.live


async def test_a_stream_outlives_the_per_try_timeout(mesh: Mesh) -> None:
    # Unary routes give a try at most 2 s (the edge's; the gateway's hop 0.05 s); a
    # stream's route has no timeout of its own, so one kept open longer is still answered,
    # on the edge and on scoring's internal listener.
    per_try = max(
        float(limits[SCORING].per_try_timeout.rstrip("s")) for limits in (EDGE_ROUTE_LIMITS, INTERNAL_ROUTE_LIMITS)
    )

    async def paced(listener: str) -> list[str]:
        async with channel(mesh.envoy.address(listener)) as chan:
            call = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(chan).ModelStreamInfer(timeout=per_try + 20)
            answers = []
            for number in range(3):
                await call.write(grpc_predict_v2_pb2.ModelInferRequest(model_name="ranker", id=f"{listener}-{number}"))
                answers.append((await call.read()).infer_response.id)
                await asyncio.sleep(per_try / 2 + 0.1)
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        return answers

    edge, internal = await asyncio.gather(paced("edge"), paced(SCORING))
    assert edge == [f"edge-{n}" for n in range(3)] and internal == [f"{SCORING}-{n}" for n in range(3)]


async def _features_replicas(mesh: Mesh, calls: int) -> list[str]:
    async with channel(mesh.envoy.address(FEATURES)) as chan:
        stub = features_pb2_grpc.FeatureServiceStub(chan)
        request = features_pb2.GetFeaturesRequest(user_id="u1", item_ids=["i1"])
        answers = [await stub.GetFeatures(request, timeout=RPC_TIMEOUT_S) for _ in range(calls)]
    return [a.model_input.datatype for a in answers]


async def test_internal_listener_spreads_across_replicas(mesh: Mesh) -> None:
    answered = await _features_replicas(mesh, 20)
    assert set(answered) == {"replica-0", "replica-1"}
    assert min(answered.count("replica-0"), answered.count("replica-1")) >= 5  # round robin


async def _features_answer(mesh: Mesh) -> str:
    """Which replica answered one call, or the gRPC status name when it failed."""
    try:
        (answer,) = await _features_replicas(mesh, 1)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return answer


async def test_not_serving_replica_gets_no_traffic(mesh: Mesh) -> None:
    replica0, replica1 = mesh.backends[FEATURES]

    def failed(backend: Backend) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            flags = await health_flags(mesh.envoy)
            return "failed_active_hc" in flags.get((FEATURES, backend.port), "")

        return probe

    def answers(expected: str) -> Callable[[], Awaitable[bool]]:
        # Workers learn health changes from the main thread by a cross-thread post.
        async def probe() -> bool:
            return await _features_answer(mesh) == expected

        return probe

    try:
        await replica0.set_serving(False)
        await until("features replica 0 marked unhealthy", mesh.envoy, failed(replica0))
        await until("traffic on replica 1 only", mesh.envoy, answers("replica-1"))
        assert set(await _features_replicas(mesh, 20)) == {"replica-1"}

        # Panic threshold 0: with no healthy replica Envoy fails fast instead of
        # sending traffic to NOT_SERVING ones (its default would, below 50% healthy).
        await replica1.set_serving(False)
        await until("features replica 1 marked unhealthy", mesh.envoy, failed(replica1))
        await until("features UNAVAILABLE", mesh.envoy, answers("UNAVAILABLE"))
        assert {await _features_answer(mesh) for _ in range(5)} == {"UNAVAILABLE"}
    finally:
        await replica0.set_serving(True)
        await replica1.set_serving(True)
    await until("features replicas healthy again", mesh.envoy, mesh.all_healthy)


async def test_access_log_is_json_per_request(mesh: Mesh) -> None:
    trace_id = "a" * 32
    headers = {"content-type": "application/json", "traceparent": f"00-{trace_id}-{'b' * 16}-01"}
    body = b'{"user_id": "u1", "candidate_ids": ["i1"]}'
    edge = mesh.envoy.address("edge")
    status, _, _ = await http_call(edge, "POST", "/v1/recommend", body, headers)
    assert status == 200

    def traced_entries() -> Iterator[dict[str, Any]]:
        for line in mesh.envoy.access_log.read_text().splitlines():
            entry = json.loads(line)  # every line must be JSON
            if (entry.get("traceparent") or "").startswith(f"00-{trace_id}-"):
                yield entry

    async def logged() -> bool:  # envoy_command flushes access logs every second
        return any(True for _ in traced_entries())

    await until("the access log entry", mesh.envoy, logged)
    entry = next(traced_entries())
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/recommend"
    assert entry["response_code"] == 200
    assert entry["grpc_status"] == 0
    assert entry["upstream_host"] == f"127.0.0.1:{mesh.backends[GATEWAY][0].port}"
    assert entry["x_request_id"]
