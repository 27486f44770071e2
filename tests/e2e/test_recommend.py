"""The reference request through the real path: Envoy -> gateway -> features (Redis) ->
scoring (ONNX Runtime) -> ranking, over REST and over gRPC, plus bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from infermesh.up.supervisor import Mesh
from infermesh.workload.catalog import generate_catalog, model_input
from infermesh.workload.seed import model_path
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.ranking.rank import RankInput, top_k

CANDIDATES = [f"i{n}" for n in range(0, 20_000, 100)]  # 200 items across the catalog
MAX_PER_CATEGORY = 5


def post(mesh: Mesh, body: bytes | dict[str, object]) -> tuple[int, dict[str, object]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{mesh.topology.edge_port}/v1/recommend",
        data=data,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"raw": text.decode(errors="replace")}


@pytest.fixture(scope="module")
def gateway_stub(mesh: Mesh) -> gateway_pb2_grpc.GatewayServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}")
    return gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.fixture(scope="module")
def expected_u42(reference_data: Path) -> list[tuple[str, float, int]]:
    """Computed without the mesh: catalog -> model rows -> local ONNX Runtime -> top-k."""
    catalog = generate_catalog()
    index = [int(i[1:]) for i in CANDIDATES]
    rows = model_input(catalog.user_vecs[42], catalog.item_vecs[index])
    session = ort.InferenceSession(str(model_path(reference_data)), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"features": rows})[0][:, 0]
    categories = catalog.item_category[index]
    chosen = top_k(RankInput(scores, categories, np.ones(len(index), bool)), 20, MAX_PER_CATEGORY)
    return [(CANDIDATES[i], float(scores[i]), int(categories[i])) for i in chosen]


def check_ranked(items: list[tuple[str, float, int]], expected: list[tuple[str, float, int]]) -> None:
    ids = [item_id for item_id, _, _ in items]
    scores = [score for _, score, _ in items]
    categories = [category for _, _, category in items]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert scores == sorted(scores, reverse=True)
    assert max(categories.count(c) for c in set(categories)) <= MAX_PER_CATEGORY
    assert ids == [item_id for item_id, _, _ in expected]
    assert np.allclose(scores, [score for _, score, _ in expected], atol=1e-5)
    assert categories == [category for _, _, category in expected]


def test_rest_recommend_returns_the_reference_ranking(mesh: Mesh, expected_u42: list) -> None:
    status, body = post(mesh, {"user_id": "u42", "candidate_ids": CANDIDATES, "k": 20})
    assert status == 200, body
    items = [(i["item_id"], i["score"], i["category"]) for i in body["items"]]
    check_ranked(items, expected_u42)
    assert body["model_name"] == "ranker" and body["model_version"] == "1"
    assert len(body["trace_id"]) == 32 and int(body["trace_id"], 16) != 0
    assert {t["stage"] for t in body["stage_timings"]} == {"features", "scoring", "ranking"}


def test_grpc_recommend_returns_the_same_ranking(
    gateway_stub: gateway_pb2_grpc.GatewayServiceStub, expected_u42: list
) -> None:
    reply = gateway_stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="u42", candidate_ids=CANDIDATES, k=20), timeout=10
    )
    check_ranked([(i.item_id, i.score, i.category) for i in reply.items], expected_u42)
    assert reply.model_version == "1" and len(reply.trace_id) == 32


def test_trace_id_reaches_rest_as_a_header_and_grpc_as_a_trailer(
    mesh: Mesh, gateway_stub: gateway_pb2_grpc.GatewayServiceStub
) -> None:
    # No Envoy tracer in this mesh: the gateway returns the trace id itself, as initial
    # metadata (a response header) only to REST calls, as trailing metadata to gRPC ones.
    request = urllib.request.Request(
        f"http://127.0.0.1:{mesh.topology.edge_port}/v1/recommend",
        data=json.dumps({"user_id": "u42", "candidate_ids": CANDIDATES[:10], "k": 3}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["x-trace-id"] == json.loads(response.read())["trace_id"]
    reply, call = gateway_stub.Recommend.with_call(
        gateway_pb2.RecommendRequest(user_id="u42", candidate_ids=CANDIDATES[:10], k=3), timeout=10
    )
    assert dict(call.trailing_metadata())["x-trace-id"] == reply.trace_id
    assert "x-trace-id" not in dict(call.initial_metadata())


def test_unknown_items_are_reported_not_ranked(gateway_stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    reply = gateway_stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="u1", candidate_ids=["i1", "nope", "i2", "i3"], k=10), timeout=10
    )
    assert reply.unknown_items == 1
    assert sorted(i.item_id for i in reply.items) == ["i1", "i2", "i3"]


@pytest.mark.parametrize(
    ("body", "status", "code", "phrase"),
    [
        ({"user_id": "u99999", "candidate_ids": ["i1"], "k": 5}, 404, grpc.StatusCode.NOT_FOUND, "unknown user"),
        ({"user_id": "u1", "candidate_ids": ["i1"], "k": 0}, 400, grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        ({"user_id": "u1", "candidate_ids": ["i1"], "k": -3}, 400, grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        ({"user_id": "u1", "candidate_ids": ["i1"], "k": 1001}, 400, grpc.StatusCode.INVALID_ARGUMENT, "k must be"),
        ({"user_id": "u1", "candidate_ids": [], "k": 5}, 400, grpc.StatusCode.INVALID_ARGUMENT, "candidate_ids"),
        ({"user_id": "", "candidate_ids": ["i1"], "k": 5}, 400, grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
        ({"user_id": "u1", "candidate_ids": ["i1", ""], "k": 5}, 400, grpc.StatusCode.INVALID_ARGUMENT, "is empty"),
    ],
)
def test_bad_requests_get_clear_errors(
    mesh: Mesh,
    gateway_stub: gateway_pb2_grpc.GatewayServiceStub,
    body: dict,
    status: int,
    code: grpc.StatusCode,
    phrase: str,
) -> None:
    http_status, reply = post(mesh, body)
    assert http_status == status and phrase in str(reply["message"]), reply
    with pytest.raises(grpc.RpcError) as raised:
        gateway_stub.Recommend(gateway_pb2.RecommendRequest(**body), timeout=10)
    assert raised.value.code() == code and phrase in raised.value.details()


@pytest.mark.parametrize("body", [b'{"user_id": "u1",', b"not json", b'{"k": "many"}'])
def test_malformed_json_is_http_400(mesh: Mesh, body: bytes) -> None:
    status, _ = post(mesh, body)
    assert status == 400


def test_mesh_survives_bad_input(mesh: Mesh, expected_u42: list) -> None:
    for body in (b"{", {"user_id": "u1", "candidate_ids": ["i1"], "k": 0}):
        post(mesh, body)
    status, reply = post(mesh, {"user_id": "u42", "candidate_ids": CANDIDATES, "k": 20})
    assert status == 200 and [i["item_id"] for i in reply["items"]] == [e[0] for e in expected_u42]
    assert all(c.process.poll() is None for c in mesh.children)


def test_unmodified_tritonclient_through_the_edge(mesh: Mesh, reference_data: Path) -> None:
    script = Path(__file__).with_name("triton_client_check.py")
    completed = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{mesh.topology.edge_port}", str(model_path(reference_data))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["metadata"]["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert report["shape"] == [200, 1] and report["max_abs_diff"] <= 1e-5
    assert report["model_version"] == "1"
    assert report["short_error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "needs 51200" in report["short_error"]["message"]
    assert report["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"
