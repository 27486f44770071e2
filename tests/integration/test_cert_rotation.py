"""Certificate rotation through the real Envoy, as deploy/components/mtls runs it: every
certificate by SDS from files (infermesh.envoy.sds), in directories laid out and updated as
the kubelet updates a mounted Secret (tests/secret_volume.py), in front of grpc servers with
the services' own TLS (services.runtime.server: certificates re-read on change, clients
checked for Envoy's name).

* Envoy's health checks reach every replica over mTLS (its certificate names Envoy, theirs
  the service: SAN-checked both ways);
* Envoy's own certificate renewed under light load through a backend listener: new
  handshakes get the new one, the same Envoy process, no failed call; a replica's new
  connections from Envoy present the new client certificate;
* the edge certificate renewed: new handshakes get the new one;
* a replica's certificate renewed: Envoy's SAN check accepts it on new connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from infermesh import certs
from infermesh.envoy import bootstrap, to_json
from infermesh.envoy.sds import SdsFiles, sds_resources, with_mesh_mtls
from services.runtime.server import ClientNameInterceptor, TlsSettings, server_credentials
from services.runtime.topology import BACKENDS, FEATURES, GATEWAY, HEALTH_SERVICE_NAMES
from tests.integration.envoy_harness import (
    RPC_TIMEOUT_S,
    SERVING,
    Envoy,
    admin_get,
    all_healthy,
    read_back_ports,
    start_envoy,
    topology_of,
    until,
)
from tests.secret_volume import SecretVolume

SERVICES = (GATEWAY, *BACKENDS)
# A method of features' that the test server answers itself, recording who called.
PROBE_METHOD = "/infermesh.features.v1.FeatureService/GetFeatures"


@dataclass
class Replica:
    """A service's grpc server with its TLS from a Secret-like volume; features also records
    the client certificate (PEM) of each call."""

    service: str
    volume: SecretVolume
    port: int = 0
    server: grpc.aio.Server | None = None
    callers: list[bytes] = field(default_factory=list)

    def tls(self) -> TlsSettings:
        return TlsSettings(
            tls_cert=str(self.volume.path("tls.crt")),
            tls_key=str(self.volume.path("tls.key")),
            tls_client_ca=str(self.volume.path("ca.crt")),
            tls_client_names=certs.ENVOY_NAME,
        )

    async def start(self) -> None:
        tls = self.tls()
        server = grpc.aio.server(interceptors=[ClientNameInterceptor(tls.client_names)])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    HEALTH_SERVICE_NAMES[FEATURES],
                    {"GetFeatures": grpc.unary_unary_rpc_method_handler(self._record)},
                )
            ]
        )
        credentials = server_credentials(tls)
        assert credentials is not None
        self.port = server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        await server.start()
        await servicer.set(HEALTH_SERVICE_NAMES[self.service], SERVING)
        self.server = server

    async def _record(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        (pem,) = context.auth_context()["x509_pem_cert"]
        self.callers.append(pem)
        return b""  # an empty GetFeaturesResponse

    async def restart(self) -> None:
        """Stop and serve again on the same port: every connection to it is new."""
        assert self.server is not None
        await self.server.stop(None)
        await self.start()


@dataclass
class Mesh:
    paths: certs.CertPaths
    envoy: Envoy
    replicas: dict[str, Replica]
    edge: SecretVolume
    mesh: SecretVolume

    def publish_envoy(self, renewed: certs.CertPaths) -> None:
        self.mesh.write({"tls.crt": renewed.client_cert, "tls.key": renewed.client_key, "ca.crt": renewed.ca_cert})

    def publish_edge(self, renewed: certs.CertPaths) -> None:
        self.edge.write({"tls.crt": renewed.edge_cert, "tls.key": renewed.edge_key})

    def publish_service(self, service: str, renewed: certs.CertPaths) -> None:
        self.replicas[service].volume.write(
            {
                "tls.crt": renewed.service_cert(service),
                "tls.key": renewed.service_key(service),
                "ca.crt": renewed.ca_cert,
            }
        )

    def gateway_channel(self) -> grpc.aio.Channel:
        """A channel to Envoy's features listener, as the gateway dials it (its certificate)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.paths.ca_cert.read_bytes(),
            private_key=self.paths.service_key(GATEWAY).read_bytes(),
            certificate_chain=self.paths.service_cert(GATEWAY).read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", certs.ENVOY_NAME), ("grpc.enable_retries", 0)]
        return grpc.aio.secure_channel(self.envoy.address(FEATURES), credentials, options=options)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    paths = certs.generate(tmp_path / "certs")
    replicas = {service: Replica(service, SecretVolume(tmp_path / f"{service}-tls")) for service in SERVICES}
    edge, mesh_volume = SecretVolume(tmp_path / "edge-tls"), SecretVolume(tmp_path / "envoy-mtls")
    files = SdsFiles(sds_dir=tmp_path / "sds", edge_dir=edge.directory, mesh_dir=mesh_volume.directory)
    try:
        for service, replica in replicas.items():
            replica.volume.write(
                {"tls.crt": paths.service_cert(service), "tls.key": paths.service_key(service), "ca.crt": paths.ca_cert}
            )
            await replica.start()
        edge.write({"tls.crt": paths.edge_cert, "tls.key": paths.edge_key})
        mesh_volume.write({"tls.crt": paths.client_cert, "tls.key": paths.client_key, "ca.crt": paths.ca_cert})
        files.sds_dir.mkdir()
        for name, resource in sds_resources(files).items():
            (files.sds_dir / name).write_text(to_json(resource))
        endpoints = [(service, replica.port) for service, replica in replicas.items()]
        config_path = tmp_path / "envoy.json"
        config_path.write_text(to_json(with_mesh_mtls(bootstrap.render(topology_of(endpoints)), files)))
        envoy = start_envoy(config_path, tmp_path)
        try:
            await until("admin and listeners", envoy, lambda: read_back_ports(envoy))
            # Envoy's health checks go over mTLS: healthy means both SAN checks passed.
            await until("every replica healthy over mTLS", envoy, lambda: all_healthy(envoy, endpoints))
            yield Mesh(paths, envoy, replicas, edge, mesh_volume)
        finally:
            envoy.stop()
    finally:
        for replica in replicas.values():
            if replica.server is not None:
                await replica.server.stop(None)


def _presented(port: int, ca: Path, client: tuple[Path, Path] | None, server_name: str, alpn: str) -> bytes:
    """The DER certificate a new TLS handshake to `port` gets."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: Path | bytes) -> bytes:
    text = pem.read_text() if isinstance(pem, Path) else pem.decode()
    return ssl.PEM_cert_to_DER_cert(text)


async def _eventually(what: str, envoy: Envoy, check: Callable[[], bool]) -> None:
    async def probe() -> bool:
        return await asyncio.to_thread(check)

    await until(what, envoy, probe)


async def _call_features(channel: grpc.aio.Channel) -> None:
    await channel.unary_unary(PROBE_METHOD)(b"", timeout=RPC_TIMEOUT_S)


async def test_envoy_certificate_rotates_under_load_without_restart(mesh: Mesh) -> None:
    envoy, paths = mesh.envoy, mesh.paths
    gateway_client = (paths.service_cert(GATEWAY), paths.service_key(GATEWAY))
    listener_port = envoy.ports[FEATURES]

    def presented() -> bytes:
        return _presented(listener_port, paths.ca_cert, gateway_client, certs.ENVOY_NAME, "h2")

    assert presented() == _der(paths.client_cert)
    features = mesh.replicas[FEATURES]
    failures: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()

    async def light_load() -> None:
        nonlocal calls
        async with mesh.gateway_channel() as channel:
            while not stop.is_set():
                try:
                    await _call_features(channel)
                    calls += 1
                except grpc.aio.AioRpcError as error:
                    failures.append(error)
                await asyncio.sleep(0.02)

    load = asyncio.create_task(light_load())
    try:
        await until("calls flowing", envoy, lambda: asyncio.sleep(0, calls > 5))
        before = calls
        renewed = certs.generate(paths.directory, renew=True)
        mesh.publish_envoy(renewed)
        await _eventually(
            "Envoy presents its renewed certificate", envoy, lambda: presented() == _der(renewed.client_cert)
        )
        await until("more calls after the rotation", envoy, lambda: asyncio.sleep(0, calls > before + 10))
    finally:
        stop.set()
        await load
    assert failures == []
    assert envoy.proc.poll() is None, "Envoy restarted"

    # New upstream connections (the replica restarted) present Envoy's renewed certificate.
    await features.restart()
    features.callers.clear()
    async with mesh.gateway_channel() as channel:
        await until("a call over a new upstream connection", envoy, lambda: _succeeds(channel))
    assert _der(features.callers[-1]) == _der(renewed.client_cert)


async def _succeeds(channel: grpc.aio.Channel) -> bool:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await _call_features(channel)
        return True
    return False


async def test_edge_certificate_rotates_without_restart(mesh: Mesh) -> None:
    envoy, paths = mesh.envoy, mesh.paths

    def presented() -> bytes:
        return _presented(envoy.ports["edge"], paths.ca_cert, None, "localhost", "http/1.1")

    assert presented() == _der(paths.edge_cert)
    renewed = certs.generate(paths.directory, renew=True)
    mesh.publish_edge(renewed)
    await _eventually(
        "the edge presents its renewed certificate", envoy, lambda: presented() == _der(renewed.edge_cert)
    )
    assert envoy.proc.poll() is None


async def test_a_replicas_renewed_certificate_passes_envoys_san_check(mesh: Mesh) -> None:
    envoy, paths = mesh.envoy, mesh.paths
    features = mesh.replicas[FEATURES]
    renewed = certs.generate(paths.directory, renew=True)
    mesh.publish_service(FEATURES, renewed)
    # Only new connections handshake again: the replica's restart makes Envoy reconnect.
    await features.restart()
    async with mesh.gateway_channel() as channel:
        await until("a call over a new upstream connection", envoy, lambda: _succeeds(channel))
    endpoint = [(FEATURES, features.port)]
    await until("features healthy with its renewed certificate", envoy, lambda: all_healthy(envoy, endpoint))


async def test_envoy_refuses_a_replica_whose_certificate_names_another_service(mesh: Mesh) -> None:
    envoy, paths = mesh.envoy, mesh.paths
    features = mesh.replicas[FEATURES]
    # features serving ranking's certificate (signed by the same CA): Envoy's SAN check fails.
    features.volume.write(
        {"tls.crt": paths.service_cert("ranking"), "tls.key": paths.service_key("ranking"), "ca.crt": paths.ca_cert}
    )
    await features.restart()
    async with mesh.gateway_channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call_features(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # Refused for the name: Envoy counts the failed SAN check on the cluster.
    await until("a SAN verification failure counted", envoy, lambda: _san_failures(envoy))


async def _san_failures(envoy: Envoy) -> bool:
    stats = await admin_get(envoy, "/stats?filter=^cluster\\.features\\.ssl\\.fail_verify_san$")
    return any(int(line.rpartition(": ")[2]) > 0 for line in stats.splitlines() if line.strip())
