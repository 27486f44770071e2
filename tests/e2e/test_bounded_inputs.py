"""Oversized and malformed requests through the real edge (Envoy -> gateway), over REST and
gRPC: every one is refused with a 4xx / INVALID_ARGUMENT (RESOURCE_EXHAUSTED for a body
over the edge's limit) whose message names the field and the limit, in a small response;
none is a 5xx, none is retried, and the mesh keeps answering."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from infermesh.envoy.http_filters import MAX_REQUEST_BYTES
from infermesh.up.supervisor import Mesh
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.e2e.test_recommend import CANDIDATES, post

pytestmark = pytest.mark.timeout(120)

SMALL = 2048  # bytes: the most an error response (body, or grpc-message) may take
GOOD = {"user_id": "u42", "candidate_ids": CANDIDATES[:20], "k": 5}

# (request fields, the phrase its message must hold): each field past its limit.
OVERSIZED: list[tuple[dict[str, Any], str]] = [
    ({"user_id": "u" * 20_000}, "user_id is 20000 characters; at most 256"),
    ({"user_id": "u" * 100_000}, "user_id is 100000 characters; at most 256"),
    ({"candidate_ids": [f"i{n}" for n in range(1001)]}, "candidate_ids has 1001 items; at most 1000"),
    ({"candidate_ids": ["i1", "i" * 300]}, "candidate_ids[1] is 300 characters; at most 256"),
    ({"candidate_ids": ["i1", "i" * 100_000]}, "candidate_ids[1] is 100000 characters; at most 256"),
    ({"k": 1001}, "k must be between 1 and 1000"),
    ({"k": -1}, "k must be between 1 and 1000"),
    ({"retrieve_candidates": 1001, "candidate_ids": []}, "retrieve_candidates is 1001; at most 1000"),
    ({"offset": 2**32 - 1}, f"offset is {2**32 - 1}; at most 1000"),
]


@pytest.fixture(scope="module")
def stub(mesh: Mesh) -> gateway_pb2_grpc.GatewayServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}")
    return gateway_pb2_grpc.GatewayServiceStub(channel)


@pytest.mark.parametrize(("fields", "phrase"), OVERSIZED)
def test_oversized_rest_fields_are_400_naming_the_field(mesh: Mesh, fields: dict[str, Any], phrase: str) -> None:
    body = json.dumps({**GOOD, **fields}).encode()
    status, reply = post(mesh, body)
    assert status == 400, (status, str(reply)[:300])
    assert reply["code"] == 3 and phrase in reply["message"], reply
    assert len(json.dumps(reply)) < SMALL


@pytest.mark.parametrize(("fields", "phrase"), OVERSIZED)
def test_oversized_grpc_fields_are_invalid_argument_naming_the_field(
    stub: gateway_pb2_grpc.GatewayServiceStub, fields: dict[str, Any], phrase: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Recommend(gateway_pb2.RecommendRequest(**{**GOOD, **fields}), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()[:300]
    assert phrase in raised.value.details() and len(raised.value.details()) < SMALL


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{", 400),
        (b"not json", 400),
        (b'{"user_id": 5, "candidate_ids": ["i1"]}', 400),
        (b'{"user_id": "u1", "candidate_ids": ["i1"], "k": "many"}', 400),
        (b'{"user_id": "u1", "candidate_ids": ["i1"], "k": 99999999999}', 400),
        (b"[" * 10_000 + b"]" * 10_000, 400),
        (b'{"user_id": "' + b"\xff\xfe" * 100 + b'", "candidate_ids": ["i1"]}', 400),
        (b'{"user_id": "' + b"u" * (MAX_REQUEST_BYTES + 1) + b'"}', 413),
    ],
)
def test_malformed_rest_bodies_are_4xx_with_a_small_json_body(mesh: Mesh, body: bytes, status: int) -> None:
    got, reply = post(mesh, body)
    assert got == status, (got, str(reply)[:300])
    assert set(reply) == {"code", "message", "details"}, reply  # google.rpc.Status, as JSON
    assert len(json.dumps(reply)) < SMALL


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x0a\x02\xff\xfe\x12\x02i1", grpc.StatusCode.INVALID_ARGUMENT),  # user_id not UTF-8
        (b"\x0a\x50abc", grpc.StatusCode.INVALID_ARGUMENT),  # a field past the message's end
        (b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),  # no message at all
        (b"\x0a" + b"\xff" * 12, grpc.StatusCode.INVALID_ARGUMENT),  # a length that is no number
        (b"x" * (MAX_REQUEST_BYTES + 1), grpc.StatusCode.RESOURCE_EXHAUSTED),  # over the edge's limit
    ],
)
def test_malformed_grpc_messages_are_client_errors(mesh: Mesh, payload: bytes, code: grpc.StatusCode) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}") as channel:
        call = channel.unary_unary("/infermesh.gateway.v1.GatewayService/Recommend")
        with pytest.raises(grpc.RpcError) as raised:
            call(payload, timeout=10)
    assert raised.value.code() == code, raised.value.details()
    assert len(raised.value.details() or "") < SMALL


def test_the_mesh_answers_after_the_bad_input(mesh: Mesh, stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    status, reply = post(mesh, GOOD)
    assert status == 200 and len(reply["items"]) == 5, reply
    assert len(stub.Recommend(gateway_pb2.RecommendRequest(**GOOD), timeout=10).items) == 5
    assert all(child.process.poll() is None for child in mesh.children)
