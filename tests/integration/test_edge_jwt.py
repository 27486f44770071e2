"""JWT at the edge and per-caller rate limits, in the real Envoy binary against stub gRPC
backends (test_envoy_policy.py's stubs: the gateway counts the calls that reach it).

Keys and tokens are made here: an RSA key pair, its JSON Web Key Set in a file (or served
over HTTP for the remote JWKS case), RS256 tokens signed with `cryptography` directly.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.caller import SUBJECT_ATTRIBUTE
from gateway.service import GatewayServicer
from infermesh.envoy import bootstrap, process
from infermesh.envoy.edge_auth import JwtAuth, system_ca_bundle
from infermesh.envoy.edge_policy import (
    CALLER_RATE_LIMIT_STAT_PREFIX,
    CLIENT_ID_HEADER,
    SUBJECT_HEADER,
    ApiKey,
    EdgePolicy,
)
from services.genproto.infermesh.gateway.v1 import gateway_pb2_grpc
from services.runtime import rpc_tracing
from services.runtime.logs import request_log
from services.runtime.metrics import Metrics
from services.runtime.server import RequestInterceptor
from services.runtime.topology import SCORING, local_topology
from tests.integration.envoy_harness import DESCRIPTOR, http_call
from tests.integration.test_envoy_policy import (
    JSON,
    RECOMMEND_BODY,
    SERVING,
    Stubs,
    _edge_health,
    _infer,
    _recommend_grpc,
    running,
    stats,
    stubs_fixture,  # noqa: F401 (the `stubs` fixture)
)

pytestmark = pytest.mark.timeout(90)

ISSUER = "https://idp.infermesh.test"
AUDIENCE = "infermesh-edge"
KID = "test-key-1"
API_KEY = "k-bob-0123456789"


# --------------------------------------------------------------------------- keys and tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64_int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # not in the JWKS


def jwks(key: rsa.RSAPrivateKey = SIGNING_KEY) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig", "n": _b64_int(numbers.n), "e": _b64_int(numbers.e)}
    return {"keys": [jwk]}


def token(
    claims: dict[str, Any] | None = None,
    *,
    key: rsa.RSAPrivateKey = SIGNING_KEY,
    alg: str = "RS256",
    drop: tuple[str, ...] = (),
) -> str:
    """An RS256 JWT from the test issuer for the edge's audience, subject alice, valid for
    an hour; `claims` override, `drop` removes claims; `alg` "none": unsigned."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 3600, **(claims or {})}
    for claim in drop:
        payload.pop(claim)
    header = {"alg": alg, "typ": "JWT", "kid": KID}
    signed = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if alg == "none":
        return f"{signed}."
    signature = key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signed}.{_b64(signature)}"


def bearer(jwt: str) -> dict[str, str]:
    return {"authorization": f"Bearer {jwt}"}


# Every kind of token the edge must refuse (and the case without one).
BAD_TOKENS: dict[str, dict[str, str]] = {
    "missing": {},
    "expired": bearer(token({"exp": int(time.time()) - 3600})),  # beyond the 60 s clock skew
    "not yet valid": bearer(token({"nbf": int(time.time()) + 3600})),
    "wrong audience": bearer(token({"aud": "another-service"})),
    "wrong issuer": bearer(token({"iss": "https://evil.example"})),
    "bad signature": bearer(token(key=OTHER_KEY)),
    "alg none": bearer(token(alg="none")),
    "no expiry": bearer(token(drop=("exp",))),
    "no subject": bearer(token(drop=("sub",))),
    "not a JWT": bearer("not-a-token"),
}


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks()))
    return path


async def _rest(address: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    return await http_call(address, "POST", "/v1/recommend", RECOMMEND_BODY, {**JSON, **headers})


def _metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(headers.items())


# --------------------------------------------------------------------------- validation


def test_envoy_accepts_every_auth_mode(tmp_path: Path, jwks_file: Path) -> None:
    local = JwtAuth(ISSUER, (AUDIENCE,), jwks_file=jwks_file)
    remote = JwtAuth(
        ISSUER, (AUDIENCE,), jwks_uri="https://idp.example/.well-known/jwks.json", jwks_ca_file=system_ca_bundle()
    )
    keys = (ApiKey("bob", API_KEY),)
    policies = [
        EdgePolicy(jwt=local),
        EdgePolicy(jwt=remote, caller_rate_limit_rps=5),
        EdgePolicy(rate_limit_rps=100, api_keys=keys, jwt=local, caller_rate_limit_rps=5, caller_rate_limit_burst=9),
        EdgePolicy(api_keys=keys, caller_rate_limit_rps=5),
    ]
    topology = local_topology({SCORING: 2}, descriptor_set=DESCRIPTOR)
    for number, edge in enumerate(policies):
        process.validate(bootstrap.write(topology, tmp_path / f"envoy-{number}.json", edge=edge))


# --------------------------------------------------------------------------- JWT


async def test_bad_tokens_get_401_and_reach_no_service(tmp_path: Path, stubs: Stubs, jwks_file: Path) -> None:
    edge = EdgePolicy(jwt=JwtAuth(ISSUER, (AUDIENCE,), jwks_file=jwks_file))
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        for kind, headers in BAD_TOKENS.items():
            status, reply_headers, body = await _rest(address, headers)
            assert status == 401, (kind, body)
            assert reply_headers["content-type"] == "application/json", kind
            reply = json.loads(body)
            assert reply["code"] == 16 and reply["details"] == [] and reply["message"], (kind, reply)
            assert await _recommend_grpc(address, _metadata(headers)) == "UNAUTHENTICATED", kind
        # The Open Inference Protocol behind the edge is protected too.
        assert await _infer(address, 1) == ["UNAUTHENTICATED"]
        assert stubs.gateway.calls == 0 and sum(sum(s.calls.values()) for s in stubs.scoring) == 0
        # Health checks need no token (probes through the edge keep working).
        assert await _edge_health(address) == SERVING


async def test_a_good_token_reaches_the_gateway_with_its_subject_only(
    tmp_path: Path, stubs: Stubs, jwks_file: Path
) -> None:
    edge = EdgePolicy(jwt=JwtAuth(ISSUER, (AUDIENCE, "other-audience"), jwks_file=jwks_file))
    # A caller's own identity headers are removed before authentication sets the real one.
    spoofed = {SUBJECT_HEADER: "mallory", CLIENT_ID_HEADER: "admin"}
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        status, _, body = await _rest(address, {**bearer(token()), **spoofed})
        assert status == 200, body
        assert stubs.gateway.metadata[SUBJECT_HEADER] == "alice"
        assert CLIENT_ID_HEADER not in stubs.gateway.metadata
        # The services get the subject, never the token.
        assert "authorization" not in stubs.gateway.metadata

        carol = bearer(token({"sub": "carol", "aud": ["x", "other-audience"]}))
        assert await _recommend_grpc(address, _metadata({**carol, **spoofed})) == "OK"
        assert stubs.gateway.metadata[SUBJECT_HEADER] == "carol"
        # Expired 30 s ago: within the clock skew (60 s by default), still accepted.
        late = bearer(token({"sub": "dave", "exp": int(time.time()) - 30}))
        assert await _recommend_grpc(address, _metadata(late)) == "OK"
        assert stubs.gateway.calls == 3


async def test_either_accepts_an_api_key_or_a_token(tmp_path: Path, stubs: Stubs, jwks_file: Path) -> None:
    edge = EdgePolicy(api_keys=(ApiKey("bob", API_KEY),), jwt=JwtAuth(ISSUER, (AUDIENCE,), jwks_file=jwks_file))
    assert edge.accepts == "either"
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        for kind, headers in {**BAD_TOKENS, "wrong key": {"x-api-key": "wrong"}}.items():
            status, _, body = await _rest(address, headers)
            assert status == 401, (kind, body)
            assert await _recommend_grpc(address, _metadata(headers)) == "UNAUTHENTICATED", kind
        assert stubs.gateway.calls == 0

        assert await _recommend_grpc(address, _metadata(bearer(token()))) == "OK"
        assert stubs.gateway.metadata[SUBJECT_HEADER] == "alice" and CLIENT_ID_HEADER not in stubs.gateway.metadata
        for headers in ({"x-api-key": API_KEY}, bearer(API_KEY)):
            status, _, body = await _rest(address, {**headers, SUBJECT_HEADER: "mallory"})
            assert status == 200, body
            assert stubs.gateway.metadata[CLIENT_ID_HEADER] == "bob" and SUBJECT_HEADER not in stubs.gateway.metadata
            assert "x-api-key" not in stubs.gateway.metadata
        assert stubs.gateway.calls == 3


class _JwksServer(http.server.ThreadingHTTPServer):
    fetches = 0


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        assert isinstance(self.server, _JwksServer)
        self.server.fetches += 1
        body = json.dumps(jwks()).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        pass


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer(("127.0.0.1", 0), _JwksHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


async def test_remote_jwks_is_fetched_once_and_cached(tmp_path: Path, stubs: Stubs, jwks_server: _JwksServer) -> None:
    uri = f"http://127.0.0.1:{jwks_server.server_address[1]}/.well-known/jwks.json"
    edge = EdgePolicy(jwt=JwtAuth(ISSUER, (AUDIENCE,), jwks_uri=uri, jwks_cache_s=600))
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        for subject in ("alice", "bob", "carol"):
            assert await _recommend_grpc(address, _metadata(bearer(token({"sub": subject})))) == "OK"
        assert await _recommend_grpc(address, _metadata(bearer(token(key=OTHER_KEY)))) == "UNAUTHENTICATED"
        assert stubs.gateway.calls == 3
        assert jwks_server.fetches == 1  # at start-up, then from the cache


# --------------------------------------------------------------------------- per-caller limits


async def test_one_caller_over_its_limit_does_not_starve_the_others(
    tmp_path: Path, stubs: Stubs, jwks_file: Path
) -> None:
    burst = 3
    edge = EdgePolicy(
        api_keys=(ApiKey("bob", API_KEY),),
        jwt=JwtAuth(ISSUER, (AUDIENCE,), jwks_file=jwks_file),
        caller_rate_limit_rps=1,
        caller_rate_limit_burst=burst,
    )
    alice = bearer(token())
    async with running(tmp_path, stubs, edge) as envoy:
        address = envoy.address("edge")
        rest = [await _rest(address, alice) for _ in range(burst + 3)]
        codes = [status for status, _, _ in rest]
        assert codes[:burst] == [200] * burst and 429 in codes, codes
        _, headers, body = rest[codes.index(429)]
        assert json.loads(body) == {"code": 8, "message": "local_rate_limited", "details": []}
        assert headers["x-ratelimit-limit"] == str(burst)
        assert await _recommend_grpc(address, _metadata(alice)) == "RESOURCE_EXHAUSTED"
        # Other callers, a JWT subject and an API-key client, each have a full bucket.
        carol = bearer(token({"sub": "carol"}))
        assert [await _recommend_grpc(address, _metadata(carol)) for _ in range(burst)] == ["OK"] * burst
        bob = {"x-api-key": API_KEY}
        assert [(await _rest(address, bob))[0] for _ in range(burst)] == [200] * burst
        # Rejected calls never reached the gateway.
        assert stubs.gateway.calls == codes.count(200) + 2 * burst
        limited = await stats(envoy, f"{CALLER_RATE_LIMIT_STAT_PREFIX}.")
        assert limited["http_local_rate_limit.rate_limited"] == codes.count(429) + 1


# --------------------------------------------------------------------------- the gateway


class _Pipeline:
    async def recommend(self, *args: object, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(
            items=[],
            model_name="m",
            model_version="1",
            stage_ms={},
            unknown_items=0,
            degraded=False,
            degraded_reasons=[],
            experiment_arm="",
            explanations=[],
            total_items=0,
        )


async def test_the_gateway_puts_the_subject_on_its_span_and_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(rpc_tracing, "tracer", lambda: provider.get_tracer("test"))
    log = io.StringIO()
    request_log.configure(log, True)
    server = grpc.aio.server(interceptors=[RequestInterceptor(Metrics("gateway").rpc())])
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(_Pipeline()), server)  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        assert await _recommend_grpc(address, ((SUBJECT_HEADER, "alice"),)) == "OK"
        assert await _recommend_grpc(address) == "OK"  # unauthenticated: no subject, none left over
    finally:
        await server.stop(None)
        request_log.configure(io.StringIO(), False)
        structlog.contextvars.clear_contextvars()
    first, second = [json.loads(line) for line in log.getvalue().splitlines()]
    assert first["subject"] == "alice" and "subject" not in second
    spans = [s for s in memory.get_finished_spans() if s.name.endswith("/Recommend")]
    assert [s.attributes.get(SUBJECT_ATTRIBUTE) for s in spans] == ["alice", None]
