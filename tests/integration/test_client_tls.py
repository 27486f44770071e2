"""The client over TLS against a real gRPC server with certificates from `infermesh certs`:
the server requires a client certificate (as the mesh's replicas do), sees the API key or
token, and answers UNAVAILABLE a few times; the client retries those within its bound."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from infermesh.certs import CertPaths, generate
from infermesh.client import ClientError, MeshClient
from infermesh.up.supervisor import free_port
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass
class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    unavailable_first: int = 0
    calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)

    def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        self.calls += 1
        self.metadata.append({key: value for key, value in context.invocation_metadata()})
        if self.calls <= self.unavailable_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return gateway_pb2.RecommendResponse(model_version="7", trace_id="t")


@dataclass
class Server:
    address: str
    certs: CertPaths
    gateway: Gateway


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    certs = generate(tmp_path / "certs")  # edge.crt names 127.0.0.1 and localhost
    gateway = Gateway()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, grpc_server)
    credentials = grpc.ssl_server_credentials(
        [(certs.edge_key.read_bytes(), certs.edge_cert.read_bytes())],
        root_certificates=certs.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    address = f"127.0.0.1:{free_port()}"
    grpc_server.add_secure_port(address, credentials)
    grpc_server.start()
    try:
        yield Server(address, certs, gateway)
    finally:
        grpc_server.stop(0)


def _client(server: Server, **options: object) -> MeshClient:
    return MeshClient(
        [server.address],
        ca_file=str(server.certs.ca_cert),
        cert_file=str(server.certs.client_cert),
        key_file=str(server.certs.client_key),
        **options,  # type: ignore[arg-type]
    )


def test_tls_with_a_client_certificate_and_an_api_key(server: Server) -> None:
    with _client(server, api_key="key-abc") as client:
        assert client.recommend("u1", ["i1"], timeout=5).model_version == "7"
    assert server.gateway.metadata[-1]["x-api-key"] == "key-abc"


def test_a_token_from_the_environment_goes_as_bearer(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_TOKEN", "jwt-xyz")
    with _client(server) as client:
        client.recommend("u1", ["i1"], timeout=5)
    assert server.gateway.metadata[-1]["authorization"] == "Bearer jwt-xyz"


def test_without_a_client_certificate_the_server_refuses(server: Server) -> None:
    with MeshClient([server.address], ca_file=str(server.certs.ca_cert), max_attempts=1) as client:
        with pytest.raises(ClientError) as failed:
            client.recommend("u1", ["i1"], timeout=5)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.gateway.calls == 0


def test_a_server_from_another_ca_is_not_trusted(server: Server, tmp_path: Path) -> None:
    other = generate(tmp_path / "other")
    with MeshClient(
        [server.address],
        ca_file=str(other.ca_cert),
        cert_file=str(server.certs.client_cert),
        key_file=str(server.certs.client_key),
        max_attempts=1,
    ) as client:
        with pytest.raises(ClientError):
            client.recommend("u1", ["i1"], timeout=5)
    assert server.gateway.calls == 0


def test_unavailable_is_retried_within_the_bound(server: Server) -> None:
    server.gateway.unavailable_first = 2
    with _client(server, max_attempts=3) as client:
        assert client.recommend("u1", ["i1"], timeout=10).model_version == "7"
    assert server.gateway.calls == 3


def test_retries_stop_at_the_bound(server: Server) -> None:
    server.gateway.unavailable_first = 10
    with _client(server, max_attempts=2) as client, pytest.raises(ClientError) as failed:
        client.recommend("u1", ["i1"], timeout=10)
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.gateway.calls == 2
