"""Edge security end to end: `infermesh up --tls DIR --api-key-file F --edge-rate-limit N`.

A mesh of this module's own, as that command runs it: certificates from `infermesh certs`,
TLS on the edge, every replica serving mTLS (only Envoy's client certificate gets in), an
API key required at the edge and a local rate limit. Checked with real clients:

* a request over TLS trusting the generated CA, with a valid key, gets ranked items;
* without a key (or with a wrong one): 401 / UNAUTHENTICATED, and the gateway never sees it;
* a replica refuses plaintext clients, TLS clients without a client certificate, and
  clients whose certificate names another service than Envoy;
* beyond the configured rate: 429 / RESOURCE_EXHAUSTED, while admitted requests succeed
  with their usual latency.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh import certs, envoy
from infermesh.up.supervisor import Mesh
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.topology import GATEWAY, HEALTH_SERVICE_NAMES, SCORING
from tests.conftest import RedisServer, running_mesh, seed_small
from tests.processes import metric

pytestmark = pytest.mark.timeout(300)

SEED = 12
REDIS_DB = 12  # a database of its own on the session's test Redis
K = 5
API_KEY = "e2e-key-6f1c0a9d"
RATE_RPS = 10
RATE_BURST = 10
RECOMMEND = {"user_id": "u3", "candidate_ids": [f"i{n}" for n in range(60)], "k": K}


@dataclass
class SecureMesh:
    mesh: Mesh
    certs: certs.CertPaths

    @property
    def edge_port(self) -> int:
        return self.mesh.topology.edge_port

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """What a client of the edge needs: the CA (the edge asks no client certificate)."""
        return certs.client_credentials(self.certs, with_client_cert=False)


@pytest.fixture(scope="module")
def secure_mesh(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[SecureMesh]:
    workdir = tmp_path_factory.mktemp("edge-security")
    url = redis_server.url_for(REDIS_DB)
    seed_small(workdir, url, SEED, force=True)
    assert certs.main(["--out", str(workdir / "certs")]) == 0
    key_file = workdir / "api-keys"
    key_file.write_text(f"# client:key\ne2e:{API_KEY}\n")
    edge = envoy.EdgePolicy(
        rate_limit_rps=RATE_RPS, rate_limit_burst=RATE_BURST, api_keys=envoy.load_api_keys(key_file)
    )
    paths = certs.CertPaths(workdir / "certs")
    # Its readiness probes go over mTLS, and through the TLS edge.
    with running_mesh(workdir, url, {SCORING: 1}, edge=edge, tls=paths) as mesh:
        yield SecureMesh(mesh, paths)


class Https:
    """A REST client of the TLS edge over one kept-alive connection (handshake once)."""

    def __init__(self, port: int, ca: str) -> None:
        self._port, self._context = port, ssl.create_default_context(cafile=ca)
        self._conn: http.client.HTTPSConnection | None = None

    def post(self, headers: dict[str, str]) -> tuple[int, bytes, float]:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection("localhost", self._port, timeout=10, context=self._context)
        started = time.perf_counter()
        try:
            self._conn.request(
                "POST",
                "/v1/recommend",
                body=json.dumps(RECOMMEND).encode(),
                headers={"content-type": "application/json", **headers},
            )
            reply = self._conn.getresponse()
            return reply.status, reply.read(), time.perf_counter() - started
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _https(port: int, ca: str, headers: dict[str, str]) -> tuple[int, bytes, float]:
    client = Https(port, ca)
    try:
        return client.post(headers)
    finally:
        client.close()


def _gateway_recommends(mesh: Mesh) -> float:
    """Recommend calls the gateway has started, from its own /metrics."""
    return metric(mesh.metrics_ports[f"{GATEWAY}-0"], "grpc_server_started_total", grpc_method="Recommend")


def _recommend(secure: SecureMesh, metadata: tuple[tuple[str, str], ...]) -> gateway_pb2.RecommendResponse:
    request = gateway_pb2.RecommendRequest(user_id=RECOMMEND["user_id"], candidate_ids=RECOMMEND["candidate_ids"], k=K)
    with grpc.secure_channel(f"localhost:{secure.edge_port}", secure.grpc_credentials()) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(request, timeout=10, metadata=metadata)


def test_tls_with_a_valid_key_gets_ranked_items(secure_mesh: SecureMesh) -> None:
    ca = str(secure_mesh.certs.ca_cert)
    status, raw, _ = _https(secure_mesh.edge_port, ca, {"x-api-key": API_KEY})
    assert status == 200, raw
    payload = json.loads(raw)
    assert len(payload["items"]) == K and not payload["degraded"]
    status, raw, _ = _https(secure_mesh.edge_port, ca, {"authorization": f"Bearer {API_KEY}"})
    assert status == 200, raw
    reply = _recommend(secure_mesh, (("x-api-key", API_KEY),))
    assert len(reply.items) == K and not reply.degraded


def test_unauthenticated_requests_get_401_and_never_reach_the_gateway(secure_mesh: SecureMesh) -> None:
    mesh = secure_mesh.mesh
    before = _gateway_recommends(mesh)
    ca = str(secure_mesh.certs.ca_cert)
    for headers in ({}, {"x-api-key": "not-the-key"}, {"authorization": "Bearer nope"}):
        status, raw, _ = _https(secure_mesh.edge_port, ca, headers)
        assert status == 401, (headers, raw)
    for metadata in ((), (("x-api-key", "not-the-key"),)):
        with pytest.raises(grpc.RpcError) as error:
            _recommend(secure_mesh, metadata)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _gateway_recommends(mesh) == before
    # and with the key it does reach it (the counter above is the right one)
    _recommend(secure_mesh, (("x-api-key", API_KEY),))
    assert _gateway_recommends(mesh) == before + 1


def test_plaintext_to_the_tls_edge_fails(secure_mesh: SecureMesh) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{secure_mesh.edge_port}")
    with channel, pytest.raises(grpc.RpcError) as error:
        gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
            gateway_pb2.RecommendRequest(user_id="u1"), timeout=5, metadata=(("x-api-key", API_KEY),)
        )
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", [GATEWAY, SCORING])
def test_services_refuse_clients_without_the_mesh_client_certificate(secure_mesh: SecureMesh, service: str) -> None:
    address = secure_mesh.mesh.topology.replicas[service][0].address
    request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[service])
    plaintext = grpc.insecure_channel(address)
    server_auth_only = grpc.secure_channel(address, secure_mesh.grpc_credentials())
    for channel in (plaintext, server_auth_only):
        with channel, pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, certs.client_credentials(secure_mesh.certs)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", [GATEWAY, SCORING])
def test_services_refuse_a_certificate_that_names_another_service(secure_mesh: SecureMesh, service: str) -> None:
    """The gateway's certificate: signed by the mesh's CA and fit for client use, but it
    names the gateway, and replicas let in only Envoy's name (<SERVICE>_TLS_CLIENT_NAMES)."""
    paths = secure_mesh.certs
    address = secure_mesh.mesh.topology.replicas[service][0].address
    credentials = grpc.ssl_channel_credentials(
        root_certificates=paths.ca_cert.read_bytes(),
        private_key=paths.service_key(GATEWAY).read_bytes(),
        certificate_chain=paths.service_cert(GATEWAY).read_bytes(),
    )
    request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[service])
    with grpc.secure_channel(address, credentials) as channel, pytest.raises(grpc.RpcError) as error:
        health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _https_get(
    port: int, path: str, context: ssl.SSLContext, headers: dict[str, str] | None = None, host: str = "localhost"
) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_oip_over_http_through_the_tls_edge_needs_the_key(secure_mesh: SecureMesh) -> None:
    # Scoring's /v2 endpoints: TLS at the edge, mTLS from Envoy to the replica's HTTP port.
    context = ssl.create_default_context(cafile=str(secure_mesh.certs.ca_cert))
    key = {"x-api-key": API_KEY}

    def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        # /v2 is under the edge's rate limit too: the tests before may have spent the burst.
        deadline = time.monotonic() + 30
        while (reply := _https_get(secure_mesh.edge_port, path, context, headers))[0] == 429:
            assert time.monotonic() < deadline, reply
            time.sleep(0.3)
        return reply

    deadline = time.monotonic() + 30  # Envoy checks the HTTP port on its own, every second
    while get("/v2/health/ready", key)[0] != 200:
        assert time.monotonic() < deadline, "scoring_http never became healthy over mTLS"
        time.sleep(0.3)
    status, body = get("/v2/models/ranker", key)
    assert status == 200 and json.loads(body)["name"] == "ranker", body
    # Without a key: Envoy's 401, in the protocol's error shape.
    status, body = get("/v2/models/ranker", {})
    assert status == 401 and list(json.loads(body)) == ["error"], body


def test_scorings_http_port_refuses_clients_without_the_mesh_client_certificate(secure_mesh: SecureMesh) -> None:
    endpoint = secure_mesh.mesh.topology.http_replicas[SCORING][0]
    plaintext = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=5)
    with pytest.raises((OSError, http.client.HTTPException)):
        plaintext.request("GET", "/v2/health/live")
        plaintext.getresponse().read()
    plaintext.close()
    context = ssl.create_default_context(cafile=str(secure_mesh.certs.ca_cert))
    context.check_hostname = False  # the certificate names the service, not 127.0.0.1
    without = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=5, context=context)
    with pytest.raises((OSError, http.client.HTTPException)):
        without.request("GET", "/v2/health/live")
        without.getresponse().read()
    without.close()
    context.load_cert_chain(str(secure_mesh.certs.client_cert), str(secure_mesh.certs.client_key))
    assert _https_get(endpoint.port, "/v2/health/live", context, host=endpoint.host) == (200, b"")


async def _flood(secure: SecureMesh, seconds: float, workers: int) -> tuple[list[float], list[str]]:
    """REST at full speed from `workers` threads for `seconds`: admitted latencies, statuses."""
    ca = str(secure.certs.ca_cert)
    admitted: list[float] = []
    codes: list[str] = []
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        client = Https(secure.edge_port, ca)
        try:
            while time.monotonic() < stop_at:
                status, raw, elapsed = await asyncio.to_thread(client.post, {"x-api-key": API_KEY})
                codes.append(str(status))
                if status == 200:
                    assert len(json.loads(raw)["items"]) == K
                    admitted.append(elapsed)
        finally:
            client.close()

    await asyncio.gather(*(worker() for _ in range(workers)))
    return admitted, codes


def test_rate_limit_rejects_the_excess_and_admitted_requests_keep_their_latency(
    secure_mesh: SecureMesh,
) -> None:
    ca = str(secure_mesh.certs.ca_cert)
    time.sleep(RATE_BURST / RATE_RPS)  # a full bucket, whatever ran before
    baseline = []
    client = Https(secure_mesh.edge_port, ca)
    try:
        for _ in range(6):  # well under the rate
            status, _, elapsed = client.post({"x-api-key": API_KEY})
            assert status == 200
            baseline.append(elapsed)
            time.sleep(1.5 / RATE_RPS)
    finally:
        client.close()
    baseline = baseline[1:]  # the first one paid for the TLS handshake
    seconds = 3.0
    admitted, codes = asyncio.run(_flood(secure_mesh, seconds, workers=4))
    assert set(codes) == {"200", "429"}, sorted(set(codes))
    # At most the burst plus the rate over the flood (and one refill of slack).
    assert len(admitted) <= RATE_BURST + RATE_RPS * (seconds + 0.5), len(admitted)
    assert codes.count("429") > len(admitted)
    # Rejections are cheap and early, and the gateway never sees more than the rate, so
    # admitted requests do not queue (the bound leaves room for the client's own threads,
    # which share this machine's two cores with Envoy and every service).
    base, flood = statistics.median(baseline), statistics.median(admitted)
    assert flood < max(4 * base, base + 0.1), f"admitted p50 {flood * 1000:.1f} ms vs {base * 1000:.1f} ms"
    # gRPC callers get RESOURCE_EXHAUSTED beyond the rate.
    grpc_codes = set()
    for _ in range(3 * RATE_BURST):
        try:
            _recommend(secure_mesh, (("x-api-key", API_KEY),))
            grpc_codes.add("OK")
        except grpc.RpcError as error:
            grpc_codes.add(error.code().name)
    assert "RESOURCE_EXHAUSTED" in grpc_codes and grpc_codes <= {"OK", "RESOURCE_EXHAUSTED"}, grpc_codes
    print(
        f"flood: {len(admitted)} admitted, {codes.count('429')} rejected in {seconds}s; "
        f"p50 {flood * 1000:.1f} ms (baseline {base * 1000:.1f} ms)"
    )
