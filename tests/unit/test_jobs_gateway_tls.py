"""The jobs workers' channel to the edge (JOBS_GATEWAY_TLS_*), against a real grpc server
serving the edge's certificate from `infermesh certs` over loopback, as Envoy's TLS edge does:

* with the CA, the worker's channel gets in; checked against the name the settings give
  (the certificate's), not the target's host;
* a certificate that does not name that server name, or a plaintext channel, gets no answer;
* settings that cannot go together, or an unreadable file, are one error naming them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from infermesh import certs
from services.jobs.settings import JobsSettings
from services.jobs.worker import gateway_channel
from services.runtime.settings import SettingsError

EDGE_NAME = "infermesh.example.com"


@dataclass
class Edge:
    target: str
    paths: certs.CertPaths


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    paths = certs.generate(tmp_path_factory.mktemp("certs"), hosts=[EDGE_NAME], days=1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([(paths.edge_key.read_bytes(), paths.edge_cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield Edge(f"127.0.0.1:{port}", paths)
    finally:
        server.stop(None)


def _check(settings: JobsSettings) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    with gateway_channel(settings) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


def test_the_worker_reaches_a_tls_edge_with_its_ca(edge: Edge) -> None:
    settings = JobsSettings(gateway_target=edge.target, gateway_tls_ca_file=str(edge.paths.ca_cert))
    assert settings.gateway_uses_tls
    assert _check(settings) == health_pb2.HealthCheckResponse.SERVING


def test_the_server_name_is_checked_instead_of_the_targets_host(edge: Edge) -> None:
    ca = str(edge.paths.ca_cert)
    named = JobsSettings(gateway_target=edge.target, gateway_tls_ca_file=ca, gateway_tls_server_name=EDGE_NAME)
    assert _check(named) == health_pb2.HealthCheckResponse.SERVING
    other = JobsSettings(gateway_target=edge.target, gateway_tls_ca_file=ca, gateway_tls_server_name="envoy")
    with pytest.raises(grpc.RpcError) as refused:
        _check(other)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_channel_gets_no_answer_from_a_tls_edge(edge: Edge) -> None:
    settings = JobsSettings(gateway_target=edge.target)
    assert not settings.gateway_uses_tls
    with pytest.raises(grpc.RpcError) as refused:
        _check(settings)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_ca_the_edge_does_not_chain_to_is_refused(edge: Edge, tmp_path: Path) -> None:
    stranger = certs.generate(tmp_path / "other", days=1)
    settings = JobsSettings(gateway_target=edge.target, gateway_tls_ca_file=str(stranger.ca_cert))
    with pytest.raises(grpc.RpcError) as refused:
        _check(settings)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(SettingsError, match="JOBS_GATEWAY_TLS_CERT_FILE and JOBS_GATEWAY_TLS_KEY_FILE"):
        JobsSettings(gateway_tls_cert_file="client.crt")


def test_a_server_name_without_tls_is_refused() -> None:
    with pytest.raises(SettingsError, match="JOBS_GATEWAY_TLS_SERVER_NAME"):
        JobsSettings(gateway_tls_server_name=EDGE_NAME)
    assert JobsSettings(gateway_tls=True, gateway_tls_server_name=EDGE_NAME).gateway_uses_tls


def test_an_unreadable_ca_file_fails_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.crt"
    settings = JobsSettings(gateway_tls_ca_file=str(missing))
    with pytest.raises(SettingsError, match="missing-ca.crt"):
        settings.gateway_credentials()
