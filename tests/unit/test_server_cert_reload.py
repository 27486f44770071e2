"""The services' TLS, on a real grpc server over loopback with certificates from `infermesh certs`:

* the server re-reads its certificate when the files change (a Kubernetes Secret update),
  so a new handshake sees the new certificate without a restart; a half-written rotation
  (a key that is not the certificate's) keeps the current one;
* the gateway's channels to Envoy follow their client certificate's files the same way;
* with mTLS, a client without a certificate, with one from another CA, or with one that
  names another service (not Envoy) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from infermesh import certs
from services.runtime.channels import MeshTlsSettings, ReloadingChannel
from services.runtime.metrics import Metrics
from services.runtime.server import ClientNameInterceptor, ReloadingSslContext, TlsSettings, serve, server_credentials
from services.runtime.settings import ServerSettings, SettingsError
from tests.secret_volume import SecretVolume

SERVICE = "features"
RPC_TIMEOUT_S = 5.0


@dataclass
class TlsServer:
    port: int
    paths: certs.CertPaths
    volume: SecretVolume

    def publish(self, cert: Path, key: Path) -> None:
        self.volume.write({"tls.crt": cert, "tls.key": key, "ca.crt": self.paths.ca_cert})


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[TlsServer]:
    paths = certs.generate(tmp_path / "certs")
    volume = SecretVolume(tmp_path / "secret")
    server_side = TlsServer(0, paths, volume)
    server_side.publish(paths.service_cert(SERVICE), paths.service_key(SERVICE))
    tls = TlsSettings(
        tls_cert=str(volume.path("tls.crt")),
        tls_key=str(volume.path("tls.key")),
        tls_client_ca=str(volume.path("ca.crt")),
        tls_client_names=certs.ENVOY_NAME,
    )
    server = grpc.aio.server(interceptors=[ClientNameInterceptor(tls.client_names)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = server_credentials(tls)
    assert credentials is not None
    server_side.port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield server_side
    finally:
        await server.stop(None)


def _presented_certificate(port: int, paths: certs.CertPaths) -> bytes:
    """The DER certificate the server presents on a new handshake (as Envoy, offering h2)."""
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    context.load_cert_chain(str(paths.client_cert), str(paths.client_key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=SERVICE) as tls:
            certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def _der(pem: Path | bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text() if isinstance(pem, Path) else pem.decode())


async def _health(port: int, credentials: grpc.ChannelCredentials) -> health_pb2.HealthCheckResponse:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return await stub.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)


async def test_a_new_handshake_sees_the_rotated_certificate(tls_server: TlsServer) -> None:
    paths = tls_server.paths
    old = _presented_certificate(tls_server.port, paths)
    assert old == _der(paths.service_cert(SERVICE))
    assert (
        await _health(tls_server.port, certs.client_credentials(paths))
    ).status == health_pb2.HealthCheckResponse.SERVING

    # A renewal from the same CA (what cert-manager does), published like a Secret update.
    renewed = certs.generate(paths.directory, renew=True)
    tls_server.publish(renewed.service_cert(SERVICE), renewed.service_key(SERVICE))

    new = await asyncio.to_thread(_presented_certificate, tls_server.port, paths)
    assert new == _der(renewed.service_cert(SERVICE)) != old
    response = await _health(tls_server.port, certs.client_credentials(renewed))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_half_written_rotation_keeps_the_current_certificate(tls_server: TlsServer, tmp_path: Path) -> None:
    paths = tls_server.paths
    current = _presented_certificate(tls_server.port, paths)
    stale_key = tmp_path / "stale.key"
    stale_key.write_bytes(paths.service_key(SERVICE).read_bytes())
    renewed = certs.generate(paths.directory, renew=True)
    # The new certificate next to the old key: unusable, so the old pair stays in service.
    tls_server.publish(renewed.service_cert(SERVICE), stale_key)
    assert _presented_certificate(tls_server.port, paths) == current
    # The key arrives: the pair is whole, and used.
    tls_server.publish(renewed.service_cert(SERVICE), renewed.service_key(SERVICE))
    assert _presented_certificate(tls_server.port, paths) == _der(renewed.service_cert(SERVICE))


async def test_a_client_without_a_certificate_is_refused(tls_server: TlsServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _health(tls_server.port, certs.client_credentials(tls_server.paths, with_client_cert=False))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_from_another_ca_is_refused(tls_server: TlsServer, tmp_path: Path) -> None:
    stranger = certs.generate(tmp_path / "other-ca")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_server.paths.ca_cert.read_bytes(),
        private_key=stranger.client_key.read_bytes(),
        certificate_chain=stranger.client_cert.read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _health(tls_server.port, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_certificate_naming_another_service_is_refused(tls_server: TlsServer) -> None:
    # Signed by the mesh's CA and fit for client use, but it names the gateway, not Envoy.
    paths = tls_server.paths
    credentials = grpc.ssl_channel_credentials(
        root_certificates=paths.ca_cert.read_bytes(),
        private_key=paths.service_key(certs.GATEWAY).read_bytes(),
        certificate_chain=paths.service_cert(certs.GATEWAY).read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _health(tls_server.port, credentials)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_key_that_is_not_the_certificates_fails_at_start(tmp_path: Path) -> None:
    paths = certs.generate(tmp_path / "certs")
    tls = TlsSettings(
        tls_cert=str(paths.service_cert(SERVICE)),
        tls_key=str(paths.service_key("ranking")),
        tls_client_ca=str(paths.ca_cert),
    )
    with pytest.raises(SettingsError, match="not a PEM certificate with its key"):
        server_credentials(tls)


def test_client_names_need_the_client_ca() -> None:
    with pytest.raises(SettingsError, match="TLS_CLIENT_NAMES needs"):
        TlsSettings(tls_cert="c", tls_key="k", tls_client_names="envoy")
    assert TlsSettings(tls_cert="c", tls_key="k", tls_client_ca="ca", tls_client_names="envoy, x").client_names == {
        "envoy",
        "x",
    }


async def test_the_http_servers_tls_reloads_too(tmp_path: Path) -> None:
    """ReloadingSslContext (scoring's HTTP port): the same rotation, over Python's ssl."""
    paths = certs.generate(tmp_path / "certs")
    volume = SecretVolume(tmp_path / "secret")
    volume.write(
        {"tls.crt": paths.service_cert(SERVICE), "tls.key": paths.service_key(SERVICE), "ca.crt": paths.ca_cert}
    )
    tls = TlsSettings(
        tls_cert=str(volume.path("tls.crt")),
        tls_key=str(volume.path("tls.key")),
        tls_client_ca=str(volume.path("ca.crt")),
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ReloadingSslContext(tls).context)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await asyncio.to_thread(_presented_certificate, port, paths) == _der(paths.service_cert(SERVICE))
        renewed = certs.generate(paths.directory, renew=True)
        volume.write(
            {"tls.crt": renewed.service_cert(SERVICE), "tls.key": renewed.service_key(SERVICE), "ca.crt": paths.ca_cert}
        )
        assert await asyncio.to_thread(_presented_certificate, port, paths) == _der(renewed.service_cert(SERVICE))
    finally:
        server.close()
        await server.wait_closed()


async def test_a_mesh_channel_presents_the_rotated_client_certificate(tmp_path: Path) -> None:
    """ReloadingChannel (the gateway's channels to Envoy): after the files change, the next
    call goes over a new connection presenting the new client certificate."""
    paths = certs.generate(tmp_path / "certs")
    callers: list[bytes] = []

    async def record(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        (pem,) = context.auth_context()["x509_pem_cert"]
        callers.append(pem)
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("probe.Probe", {"Who": grpc.unary_unary_rpc_method_handler(record)})]
    )
    tls = TlsSettings(
        tls_cert=str(paths.service_cert(SERVICE)),
        tls_key=str(paths.service_key(SERVICE)),
        tls_client_ca=str(paths.ca_cert),
    )
    credentials = server_credentials(tls)
    assert credentials is not None
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    volume = SecretVolume(tmp_path / "gateway-tls")
    volume.write(
        {
            "tls.crt": paths.service_cert(certs.GATEWAY),
            "tls.key": paths.service_key(certs.GATEWAY),
            "ca.crt": paths.ca_cert,
        }
    )
    mesh_tls = MeshTlsSettings(
        ca=str(volume.path("ca.crt")),
        cert=str(volume.path("tls.crt")),
        key=str(volume.path("tls.key")),
        server_name=SERVICE,
    )
    channel = ReloadingChannel(f"127.0.0.1:{port}", mesh_tls, check_seconds=0)
    who = channel.unary_unary("/probe.Probe/Who")  # as a stub holds it, across the rotation
    first = _der(paths.service_cert(certs.GATEWAY))
    try:
        await who(b"", timeout=RPC_TIMEOUT_S)
        renewed = certs.generate(paths.directory, renew=True)  # same directory: new files
        volume.write(
            {
                "tls.crt": renewed.service_cert(certs.GATEWAY),
                "tls.key": renewed.service_key(certs.GATEWAY),
                "ca.crt": paths.ca_cert,
            }
        )
        await who(b"", timeout=RPC_TIMEOUT_S)
    finally:
        await channel.close()
        await server.stop(None)
    assert [_der(pem) for pem in callers] == [first, _der(renewed.service_cert(certs.GATEWAY))]


class _HealthOnly:
    """The least a Service is for serve(): health only, always ready."""

    name = "ranking"
    grpc_services = ("infermesh.ranking.v1.RankingService",)

    def __init__(self) -> None:
        self.metrics = Metrics(self.name)

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self) -> None:
        pass

    async def readiness(self) -> tuple[bool, str]:
        return True, "ready"

    async def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_serve_wires_mtls_client_names_and_the_plaintext_health_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve() as a service runs it on Kubernetes: <SERVICE>_TLS_* from the environment."""
    paths = certs.generate(tmp_path / "certs")
    port, health_port = _free_port(), _free_port()
    for name, value in certs.service_tls_env("ranking", paths).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RANKING_PLAINTEXT_HEALTH_PORT", str(health_port))
    stop = asyncio.Event()
    settings = ServerSettings(port=port, readiness_interval_seconds=0.05, grace_seconds=0)
    task = asyncio.create_task(serve(_HealthOnly(), settings, stop))
    request = health_pb2.HealthCheckRequest(service=_HealthOnly.grpc_services[0])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(100):  # until serve() is up and has published readiness
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if (await stub.Check(request, timeout=1)).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the plaintext health port never said SERVING")
        assert (await _health(port, certs.client_credentials(paths))).status == health_pb2.HealthCheckResponse.SERVING
        gateway_cert = grpc.ssl_channel_credentials(
            root_certificates=paths.ca_cert.read_bytes(),
            private_key=paths.service_key(certs.GATEWAY).read_bytes(),
            certificate_chain=paths.service_cert(certs.GATEWAY).read_bytes(),
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _health(port, gateway_cert)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # The plaintext port serves health alone: the gRPC port stays TLS-only.
        with pytest.raises(grpc.aio.AioRpcError):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
    finally:
        stop.set()
        await task
