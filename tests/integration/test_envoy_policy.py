"""Traffic and edge policies in the real Envoy binary, against stub gRPC backends.

Retries (idempotent calls only), hedged per-try timeouts, outlier detection, default
deadlines, load shedding, the edge rate limit, API keys and TLS/mTLS: each test starts an
Envoy of its own (ports picked by the kernel, read back from the admin API) in front of
in-process grpc.aio stubs whose behaviour the test switches (fail with UNAVAILABLE, hang,
answer slowly), and counts what reached them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh import certs
from infermesh.envoy import bootstrap, process
from infermesh.envoy.edge_policy import (
    ADMISSION_MIN_CONCURRENCY,
    ADMISSION_RUNTIME_KEY,
    CLIENT_ID_HEADER,
    RATE_LIMIT_STAT_PREFIX,
    ApiKey,
    EdgePolicy,
)
from infermesh.envoy.http_filters import MAX_REQUEST_BYTES
from infermesh.envoy.resilience import EDGE_ROUTE_LIMITS, INTERNAL_ROUTE_LIMITS
from infermesh.envoy.tracing import Tracing
from services.genproto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.server import TlsSettings, server_credentials
from services.runtime.topology import (
    FEATURES,
    GATEWAY,
    HEALTH_SERVICE_NAMES,
    RANKING,
    SCORING,
    local_topology,
)
from tests.integration.envoy_harness import (
    DESCRIPTOR,
    Backend,
    Envoy,
    admin_get,
    health_flags,
    http_call,
    running_envoy,
    start_backend,
    until,
)

pytestmark = pytest.mark.timeout(90)

RPC_TIMEOUT_S = 8.0
SERVING = health_pb2.HealthCheckResponse.SERVING
API_KEY = "k-alice-0123456789"
RECOMMEND_BODY = json.dumps({"user_id": "u1", "candidate_ids": ["i1", "i2"], "k": 1}).encode()
JSON = {"content-type": "application/json"}


# --------------------------------------------------------------------------- stubs


@dataclass
class CountingGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Counts Recommend calls and keeps the metadata and deadline of the last one; takes
    `delay` seconds to answer."""

    calls: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    time_remaining: float | None = None
    delay: float = 0.0

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        self.calls += 1
        self.metadata = {key: value for key, value in context.invocation_metadata()}
        self.time_remaining = context.time_remaining()
        await asyncio.sleep(self.delay)
        return gateway_pb2.RecommendResponse(model_name="stub", model_version="1")


@dataclass
class SwitchableScoring(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer and RepositoryModelLoad: answer, fail with UNAVAILABLE, or hang."""

    replica: int
    mode: str = "ok"  # ok | unavailable | hang
    calls: dict[str, int] = field(default_factory=dict)

    async def _act(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {self.replica} is failing")
        if self.mode == "hang":
            await asyncio.sleep(30)

    async def ModelInfer(
        self, request: grpc_predict_v2_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> grpc_predict_v2_pb2.ModelInferResponse:
        await self._act("ModelInfer", context)
        return grpc_predict_v2_pb2.ModelInferResponse(model_name=f"replica-{self.replica}")

    async def RepositoryModelLoad(
        self, request: grpc_predict_v2_pb2.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> grpc_predict_v2_pb2.RepositoryModelLoadResponse:
        await self._act("RepositoryModelLoad", context)
        return grpc_predict_v2_pb2.RepositoryModelLoadResponse()


@dataclass
class Stubs:
    gateway: CountingGateway
    scoring: list[SwitchableScoring]
    servers: list[Backend]

    def replicas(self) -> list[tuple[str, int]]:
        return [(server.service, server.port) for server in self.servers]

    def port(self, service: str) -> int:
        return next(s.port for s in self.servers if s.service == service)


async def _serve_stubs(credentials: Callable[[str], grpc.ServerCredentials] | None = None) -> Stubs:
    """A gateway, two scoring replicas, features and ranking (health only); plaintext, or
    TLS with each service's own credentials (made per server: grpc uses reloading ones once)."""
    gateway = CountingGateway()
    scoring = [SwitchableScoring(0), SwitchableScoring(1)]
    plan: list[tuple[str, Callable[[grpc.aio.Server], None] | None]] = [
        (GATEWAY, lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, s)),
        *[
            (SCORING, lambda s, r=r: grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(r, s))
            for r in scoring
        ],
        (FEATURES, None),
        (RANKING, None),
    ]
    servers = [
        await start_backend(service, add, None if credentials is None else credentials(service))
        for service, add in plan
    ]
    return Stubs(gateway, scoring, servers)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    stubs: Stubs,
    edge: EdgePolicy | None = None,
    tls: certs.CertPaths | None = None,
) -> AsyncIterator[Envoy]:
    """An Envoy of its own in front of `stubs`, up with every replica healthy."""
    workdir = tmp_path / f"envoy-{time.monotonic_ns()}"
    workdir.mkdir()
    async with running_envoy(workdir, stubs.replicas(), edge, tls) as envoy:
        yield envoy


@pytest.fixture(name="stubs")  # named apart from its function, so test_edge_jwt can import it
async def stubs_fixture() -> AsyncIterator[Stubs]:
    served = await _serve_stubs()
    try:
        yield served
    finally:
        for stub in served.servers:
            await stub.server.stop(None)


async def stats(envoy: Envoy, prefix: str) -> dict[str, int]:
    """Counters and gauges under `prefix` (e.g. "cluster.scoring.") from admin /stats."""
    text = await admin_get(envoy, "/stats")
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name.startswith(prefix) and value.strip().isdigit():
            out[name[len(prefix) :]] = int(value)
    return out


async def _infer(address: str, calls: int, method: str = "ModelInfer") -> list[str]:
    """`calls` sequential calls; the replica that answered, or the status code name."""
    out = []
    async with grpc.aio.insecure_channel(address) as chan:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(chan)
        for _ in range(calls):
            try:
                if method == "ModelInfer":
                    reply = await stub.ModelInfer(
                        grpc_predict_v2_pb2.ModelInferRequest(model_name="m"), timeout=RPC_TIMEOUT_S
                    )
                    out.append(reply.model_name)
                else:
                    await stub.RepositoryModelLoad(
                        grpc_predict_v2_pb2.RepositoryModelLoadRequest(model_name="m"), timeout=RPC_TIMEOUT_S
                    )
                    out.append("loaded")
            except grpc.aio.AioRpcError as error:
                out.append(error.code().name)
    return out


# --------------------------------------------------------------------------- validation


def test_envoy_accepts_every_policy_and_tls(tmp_path: Path) -> None:
    paths = certs.generate(tmp_path / "certs")
    tls = certs.CertPaths.checked(paths.directory)
    edge = EdgePolicy(rate_limit_rps=100, rate_limit_burst=300, api_keys=(ApiKey("alice", API_KEY),))
    for tracing in (None, Tracing("http://127.0.0.1:4317")):
        config = bootstrap.write(
            local_topology({SCORING: 2}, descriptor_set=DESCRIPTOR), tmp_path / "envoy.json", tracing, edge, tls
        )
        process.validate(config)
    unshed = EdgePolicy(admission_latency_ms=None)
    process.validate(bootstrap.write(local_topology(descriptor_set=DESCRIPTOR), tmp_path / "unshed.json", edge=unshed))


def test_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert certs.main(["--out", str(out), "--host", "mesh.example", "--host", "10.1.2.3"]) == 0
    paths = certs.CertPaths(out.resolve())
    assert paths.missing() == []
    for key in (paths.ca_key, paths.edge_key, paths.client_key, paths.service_key(SCORING)):
        assert key.stat().st_mode & 0o077 == 0, key  # private keys: owner only
    from cryptography import x509

    edge = x509.load_pem_x509_certificate(paths.edge_cert.read_bytes())
    names = edge.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mesh.example" in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.1.2.3"}
    scoring = x509.load_pem_x509_certificate(paths.service_cert(SCORING).read_bytes())
    scoring_names = scoring.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert SCORING in scoring_names.get_values_for_type(x509.DNSName)  # what Envoy checks
    # Idempotent: a second run keeps the CA (certificates already handed out stay valid).
    before = paths.ca_cert.read_bytes()
    capsys.readouterr()
    assert certs.main(["--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out
    assert paths.ca_cert.read_bytes() == before
    assert certs.main(["--out", str(out), "--force"]) == 0
    assert paths.ca_cert.read_bytes() != before


# --------------------------------------------------------------------------- retries


async def test_unavailable_replica_is_retried_elsewhere_and_ejected(tmp_path: Path, stubs: Stubs) -> None:
    failing, _ = stubs.scoring
    failing.mode = "unavailable"  # health still says SERVING: only outlier detection sees it
    async with running(tmp_path, stubs) as envoy:
        answers = await _infer(envoy.address(SCORING), 30)
        assert set(answers) == {"replica-1"}, answers  # every call succeeded, on the healthy one
        assert failing.calls["ModelInfer"] >= 1
        counters = await stats(envoy, "cluster.scoring.")
        assert counters["upstream_rq_retry"] >= 1
        assert counters["upstream_rq_retry_success"] >= 1
        assert counters["outlier_detection.ejections_enforced_total"] >= 1
        assert counters["outlier_detection.ejections_enforced_consecutive_gateway_failure"] >= 1


async def test_state_changing_calls_are_not_retried(tmp_path: Path, stubs: Stubs) -> None:
    stubs.scoring[0].mode = "unavailable"
    async with running(tmp_path, stubs) as envoy:
        answers = await _infer(envoy.address(SCORING), 4, method="RepositoryModelLoad")
        # Round robin sends some loads to the failing replica: the caller sees its error.
        assert "UNAVAILABLE" in answers and "loaded" in answers, answers
        counters = await stats(envoy, "cluster.scoring.")
        assert counters.get("upstream_rq_retry", 0) == 0
        assert sum(s.calls.get("RepositoryModelLoad", 0) for s in stubs.scoring) == 4  # each ran once


async def test_hung_replica_costs_one_hedged_per_try_timeout(tmp_path: Path, stubs: Stubs) -> None:
    hung = stubs.scoring[0]
    hung.mode = "hang"  # like SIGSTOP: connected, the call never returns
    per_try = float(INTERNAL_ROUTE_LIMITS[SCORING].per_try_timeout.rstrip("s"))
    async with running(tmp_path, stubs) as envoy:
        address = envoy.address(SCORING)  # the gateway's hop

        async def timed_call() -> tuple[list[str], float]:
            started = time.monotonic()
            answers = await _infer(address, 1)
            return answers, time.monotonic() - started

        # Round robin sends half of them to the hung replica.
        results = await asyncio.gather(*(timed_call() for _ in range(12)))
        answers = [answer for answer_list, _ in results for answer in answer_list]
        if answers != ["replica-1"] * 12:
            # Seen once in CI, never reproduced: keep what explains it (hedges sent or refused,
            # which replica Envoy held healthy) in the failure.
            counters = await stats(envoy, "cluster.scoring.")
            hedging = {k: v for k, v in counters.items() if "retry" in k or "timeout" in k or "eject" in k}
            pytest.fail(f"{answers}\nhealth: {await health_flags(envoy)}\n{hedging}\n{envoy.logs()}")
        assert hung.calls["ModelInfer"] >= 5
        # Each cost about one per-try timeout (0.05 s) before its hedge on the other
        # replica answered, not the call's deadline (5 s): generous bounds, loaded machine.
        assert max(elapsed for _, elapsed in results) < per_try + 1.5, results
        counters = await stats(envoy, "cluster.scoring.")
        assert counters["upstream_rq_retry"] >= 5, counters

        # Timeouts are local-origin failures: concurrent ones in a row eject the replica.
        ejections = await stats(envoy, "cluster.scoring.outlier_detection.")
        assert ejections["ejections_enforced_consecutive_local_origin_failure"] >= 1, ejections


async def test_hung_replica_is_ejected_by_its_failure_percentage(tmp_path: Path, stubs: Stubs) -> None:
    stubs.scoring[0].mode = "hang"
    async with running(tmp_path, stubs) as envoy:
        # Only the failure percentage left: Envoy counts each call's stream as a local success
        # before its timeout, so with calls one after another no two failures are in a row.
        key = "outlier_detection.consecutive_local_origin_failure"
        assert (await http_call(envoy.admin, "POST", f"/runtime_modify?{key}=1000"))[0] == 200
        # Three callers one call after another: both replicas see enough calls in a second.
        answers = await asyncio.gather(*(_infer(envoy.address(SCORING), 12) for _ in range(3)))
        assert {answer for answer_list in answers for answer in answer_list} == {"replica-1"}

        async def ejected() -> bool:
            counters = await stats(envoy, "cluster.scoring.outlier_detection.")
            return counters["ejections_enforced_local_origin_failure_percentage"] >= 1

        # Every call it got timed out (50% of its local events): out at a sweep (every second).
        await until("the hung replica's ejection", envoy, ejected)


async def test_edge_cuts_a_hung_replica_after_its_per_try_timeout(tmp_path: Path, stubs: Stubs) -> None:
    stubs.scoring[0].mode = "hang"
    per_try = float(EDGE_ROUTE_LIMITS[SCORING].per_try_timeout.rstrip("s"))
    async with running(tmp_path, stubs) as envoy:
        started = time.monotonic()
        answers = await _infer(envoy.address("edge"), 2)  # one of the two lands on the hung one
        elapsed = time.monotonic() - started
        assert answers == ["replica-1", "replica-1"], answers
        assert elapsed < per_try + 3.0, elapsed
        counters = await stats(envoy, "cluster.scoring.")
        assert counters["upstream_rq_per_try_timeout"] >= 1


# --------------------------------------------------------------------------- deadlines


async def test_every_edge_request_has_a_deadline(tmp_path: Path, stubs: Stubs) -> None:
    default = float(EDGE_ROUTE_LIMITS[GATEWAY].default_deadline.rstrip("s"))
    async with running(tmp_path, stubs) as envoy:
        address = envoy.address("edge")
        # REST callers cannot set one: the gateway is told the edge's default.
        status, _, raw = await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, JSON)
        assert status == 200, raw
        assert stubs.gateway.time_remaining is not None and 0 < stubs.gateway.time_remaining <= default
        # A gRPC caller's own deadline is passed on as it is.
        async with grpc.aio.insecure_channel(address) as chan:
            await gateway_pb2_grpc.GatewayServiceStub(chan).Recommend(
                gateway_pb2.RecommendRequest(user_id="u1"), timeout=default / 4
            )
        assert stubs.gateway.time_remaining is not None and stubs.gateway.time_remaining < default / 2
        # A gateway that does not answer in time: the edge answers DEADLINE_EXCEEDED itself.
        stubs.gateway.delay = default + 5
        started = time.monotonic()
        status, headers, raw = await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, JSON)
        assert status == 504 and headers["content-type"] == "application/json", raw
        assert json.loads(raw)["code"] == 4  # DEADLINE_EXCEEDED
        assert await _recommend_grpc(address, timeout=None) == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 2 * default + 3.0


# --------------------------------------------------------------------------- load shedding


async def test_edge_sheds_a_burst_with_resource_exhausted_at_once(tmp_path: Path, stubs: Stubs) -> None:
    stubs.gateway.delay = 1.0  # every admitted call holds its slot a second (< the per-try timeout)
    floor = ADMISSION_MIN_CONCURRENCY  # the limit a fresh edge starts from
    async with running(tmp_path, stubs) as envoy:
        address = envoy.address("edge")

        async def timed_grpc() -> tuple[str, float]:
            started = time.monotonic()
            code = await _recommend_grpc(address)
            return code, time.monotonic() - started

        burst = [asyncio.create_task(timed_grpc()) for _ in range(floor + 8)]

        async def limit_reached() -> bool:
            return stubs.gateway.calls >= floor

        await until("the admitted calls reaching the gateway", envoy, limit_reached)
        # With the limit in flight, REST callers are turned away too, with a JSON body.
        for _ in range(3):
            started = time.monotonic()
            status, headers, raw = await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, JSON)
            assert time.monotonic() - started < stubs.gateway.delay  # at once, not queued
            assert status == 429 and headers["content-type"] == "application/json", raw
            assert json.loads(raw) == {"code": 8, "message": "reached concurrency limit", "details": []}
        results = await asyncio.gather(*burst)

        codes = sorted(code for code, _ in results)
        # gRPC callers get RESOURCE_EXHAUSTED, which they do not retry, not UNAVAILABLE.
        assert codes == ["OK"] * floor + ["RESOURCE_EXHAUSTED"] * 8, codes
        shed = [elapsed for code, elapsed in results if code != "OK"]
        assert max(shed) < stubs.gateway.delay, shed  # answered at once, not after queueing
        assert stubs.gateway.calls == floor
        blocked = await stats(envoy, "http.edge.adaptive_concurrency.gradient_controller.")
        assert blocked["rq_blocked"] == 8 + 3
        # Operators can switch it off without a restart.
        status, _, _ = await http_call(envoy.admin, "POST", f"/runtime_modify?{ADMISSION_RUNTIME_KEY}=false")
        assert status == 200
        stubs.gateway.delay = 0.2
        unshed = await asyncio.gather(*(_recommend_grpc(address) for _ in range(floor + 8)))
        assert set(unshed) == {"OK"}, unshed


async def _recommend_grpc(
    address: str, metadata: tuple[tuple[str, str], ...] = (), timeout: float | None = RPC_TIMEOUT_S
) -> str:
    async with grpc.aio.insecure_channel(address) as chan:
        stub = gateway_pb2_grpc.GatewayServiceStub(chan)
        try:
            await stub.Recommend(gateway_pb2.RecommendRequest(user_id="u1"), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return "OK"


async def _edge_health(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = (
        grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(address, credentials)
    )
    async with channel as chan:
        reply = await health_pb2_grpc.HealthStub(chan).Check(
            health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[GATEWAY]), timeout=RPC_TIMEOUT_S
        )
    return reply.status


async def test_edge_rate_limit_answers_429_and_resource_exhausted(tmp_path: Path, stubs: Stubs) -> None:
    edge = EdgePolicy(rate_limit_rps=2, rate_limit_burst=4)
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        started = time.monotonic()
        rest = [await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, JSON) for _ in range(12)]
        codes = [status for status, _, _ in rest]
        admitted = codes.count(200)
        # The burst, plus what refilled meanwhile (2/s); everything else is 429.
        assert 4 <= admitted <= 4 + 2 * (time.monotonic() - started) + 1, codes
        assert set(codes) == {200, 429}, codes
        _, headers, body = rest[codes.index(429)]
        assert headers["x-ratelimit-limit"] == "4" and headers["x-ratelimit-remaining"] == "0"
        # Like a service's errors: a google.rpc.Status JSON body (RESOURCE_EXHAUSTED = 8).
        assert headers["content-type"] == "application/json", headers
        assert json.loads(body) == {"code": 8, "message": "local_rate_limited", "details": []}
        # gRPC callers get RESOURCE_EXHAUSTED (not UNAVAILABLE, which clients would retry).
        grpc_codes = [await _recommend_grpc(address) for _ in range(8)]
        assert "RESOURCE_EXHAUSTED" in grpc_codes and set(grpc_codes) <= {"OK", "RESOURCE_EXHAUSTED"}, grpc_codes
        # Rejected calls never reached the gateway; health checks are not limited.
        assert stubs.gateway.calls == admitted + grpc_codes.count("OK")
        assert await _edge_health(address) == SERVING
        limited = await stats(envoy, f"{RATE_LIMIT_STAT_PREFIX}.")
        assert limited["http_local_rate_limit.rate_limited"] == codes.count(429) + grpc_codes.count(
            "RESOURCE_EXHAUSTED"
        )
        # Shadow mode without a restart, through the (loopback-only) admin API's runtime.
        status, _, _ = await http_call(envoy.admin, "POST", "/runtime_modify?edge_rate_limit.enforced=0")
        assert status == 200
        shadow = [await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, JSON) for _ in range(8)]
        assert {status for status, _, _ in shadow} == {200}


async def test_envoys_own_rest_errors_are_json_grpc_ones_stay_grpc(tmp_path: Path, stubs: Stubs) -> None:
    async with running(tmp_path, stubs, EdgePolicy()) as envoy:
        address = envoy.address("edge")
        cases = {
            400: (b'{"user_id": "u1", "k": "many"}', 3),  # the transcoder cannot parse it
            413: (b'{"user_id": "' + b"x" * (MAX_REQUEST_BYTES + 1) + b'"}', 8),
        }
        for expected, (body, code) in cases.items():
            status, headers, raw = await http_call(address, "POST", "/v1/recommend", body, JSON)
            assert status == expected, raw[:200]
            assert headers["content-type"] == "application/json", headers
            reply = json.loads(raw)
            assert reply["code"] == code and reply["message"] and reply["details"] == [], reply
        assert stubs.gateway.calls == 0
        # A gRPC caller's error from Envoy keeps a plain grpc-message, not the JSON body.
        async with grpc.aio.insecure_channel(address) as chan:
            call = chan.unary_unary("/infermesh.gateway.v1.GatewayService/Recommend")
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(b"x" * (MAX_REQUEST_BYTES + 1), timeout=RPC_TIMEOUT_S)
            assert not (failure.value.details() or "").startswith("{"), failure.value.details()
            # The code a REST caller's body says, not UNKNOWN (what Envoy derives from 413).
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- API keys


async def test_api_keys_401_without_reaching_the_gateway(tmp_path: Path, stubs: Stubs) -> None:
    edge = EdgePolicy(api_keys=(ApiKey("alice", API_KEY),))
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
            status, reply_headers, body = await http_call(
                address, "POST", "/v1/recommend", RECOMMEND_BODY, {**JSON, **headers}
            )
            assert status == 401, headers
            assert reply_headers["content-type"] == "application/json"
            reply = json.loads(body)
            assert reply["code"] == 16 and reply["details"] == [] and isinstance(reply["message"], str)
        assert await _recommend_grpc(address) == "UNAUTHENTICATED"
        assert await _recommend_grpc(address, (("x-api-key", "wrong"),)) == "UNAUTHENTICATED"
        # The Open Inference Protocol at the edge is protected too.
        assert (await _infer(address, 1)) == ["UNAUTHENTICATED"]
        assert stubs.gateway.calls == 0 and sum(sum(s.calls.values()) for s in stubs.scoring) == 0

        for headers in ({"x-api-key": API_KEY}, {"authorization": f"Bearer {API_KEY}"}):
            status, _, raw = await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, {**JSON, **headers})
            assert status == 200, raw
        assert await _recommend_grpc(address, (("x-api-key", API_KEY),)) == "OK"
        assert stubs.gateway.calls == 3
        # The gateway learns who called, never the key.
        assert stubs.gateway.metadata[CLIENT_ID_HEADER] == "alice"
        assert "x-api-key" not in stubs.gateway.metadata
        # Health checks need no key (probes through the edge keep working).
        assert await _edge_health(address) == SERVING


# --------------------------------------------------------------------------- TLS / mTLS


@pytest.fixture
async def tls_stubs(tmp_path: Path) -> AsyncIterator[tuple[Stubs, certs.CertPaths]]:
    paths = certs.generate(tmp_path / "certs")

    # Each stub serves its own service's certificate (Envoy checks the service name) and
    # requires a client certificate from the CA, as `infermesh up --tls` runs them.
    def credentials(service: str) -> grpc.ServerCredentials:
        tls = TlsSettings(
            tls_cert=str(paths.service_cert(service)),
            tls_key=str(paths.service_key(service)),
            tls_client_ca=str(paths.ca_cert),
        )
        made = server_credentials(tls)
        assert made is not None
        return made

    stubs = await _serve_stubs(credentials)
    try:
        yield stubs, paths
    finally:
        for stub in stubs.servers:
            await stub.server.stop(None)


def _https_sync(port: int, ca: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("localhost", port, timeout=RPC_TIMEOUT_S, context=context)
    try:
        conn.request("POST", "/v1/recommend", body=RECOMMEND_BODY, headers=JSON)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_tls_edge_and_mtls_to_services(tmp_path: Path, tls_stubs: tuple[Stubs, certs.CertPaths]) -> None:
    stubs, paths = tls_stubs
    tls = certs.CertPaths.checked(paths.directory)
    # Envoy's own health checks already went over mTLS: `running` waits for all healthy.
    async with running(tmp_path, stubs, tls=tls) as envoy:
        edge_port = envoy.ports["edge"]
        status, raw = await asyncio.to_thread(_https_sync, edge_port, paths.ca_cert)
        assert status == 200, raw
        ca_only = certs.client_credentials(paths, with_client_cert=False)
        async with grpc.aio.secure_channel(f"localhost:{edge_port}", ca_only) as chan:
            reply = await gateway_pb2_grpc.GatewayServiceStub(chan).Recommend(
                gateway_pb2.RecommendRequest(user_id="u1"), timeout=RPC_TIMEOUT_S
            )
        assert reply.model_name == "stub"
        assert stubs.gateway.calls == 2
        # Plaintext to the TLS edge gets nowhere.
        assert await _recommend_grpc(envoy.address("edge")) == "UNAVAILABLE"

    # The services themselves: a client certificate from the CA, or no connection.
    gateway = f"127.0.0.1:{stubs.port(GATEWAY)}"
    assert await _edge_health(gateway, certs.client_credentials(paths)) == SERVING
    for credentials in (None, ca_only):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _edge_health(gateway, credentials)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_service_tls_settings() -> None:
    from services.runtime.server import load_tls_settings
    from services.runtime.settings import SettingsError

    assert load_tls_settings("scoring", {}).mode == "plaintext"
    tls = load_tls_settings("scoring", {"SCORING_TLS_CERT": "c", "SCORING_TLS_KEY": "k"})
    assert tls.mode == "tls"
    env = certs.service_tls_env("scoring", certs.CertPaths(Path("/x")))
    assert load_tls_settings("scoring", env).mode == "mtls"
    assert env["SCORING_TLS_CLIENT_CA"] == "/x/ca.crt"
    for bad in ({"SCORING_TLS_CERT": "c"}, {"SCORING_TLS_CLIENT_CA": "ca"}):
        with pytest.raises(SettingsError):
            load_tls_settings("scoring", bad)
    with pytest.raises(SettingsError, match="cannot read"):
        server_credentials(TlsSettings(tls_cert="/nonexistent.crt", tls_key="/nonexistent.key"))
