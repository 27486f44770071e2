"""No key, token or password leaks (issue 20, item 6): `infermesh up` with known secrets, then
a grep for each of them everywhere the mesh writes or answers.

The mesh is the one a user starts: its own redis-server with the password `up` generates,
API keys from a file and JWTs checked against a JWKS file (either is accepted), a Celery
worker, and every span exported to an OTLP receiver in this process. Good and bad
credentials are sent over REST and gRPC. Then no secret value may appear in:

* `infermesh up`'s output (stdout and stderr, one stream here);
* any file under the data dir's logs/, and any other file of the data dir but the three
  that must hold one (`up`'s Redis password file, redis.conf, Envoy's config with the API
  keys), which only their owner may read;
* any span received (the raw OTLP exports: attributes, events, status, resources);
* any replica's /metrics, and Envoy's admin /stats and /config_dump;
* any answer a client got (bodies, gRPC details and trailing metadata);
* the command line (/proc/<pid>/cmdline) of every process the mesh started.

The secrets: the API key (and a refused one, which may be a real key of something else),
the good and the expired token and their signature parts, the Redis password and the JWT
signing key's PEM body. The files that hold them on purpose (the key file, the JWKS, the
private key, and the three above) are not searched.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from infermesh.settings import redis_password_file
from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore
from infermesh.up.supervisor import free_port, free_port_block
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.processes import descendants, read_until, stop_reading

pytestmark = pytest.mark.timeout(300)

ISSUER = "https://idp.leak.test"
AUDIENCE = "infermesh-leak-test"
SUBJECT = "leak-test-subject"
# Every hop of a request exports spans: the search covers each of them.
EXPORTERS = {"envoy", "gateway", "features", "scoring", "ranking"}
KID = "leak-test-key"
# Random per run: a match can only come from this run's secrets.
API_KEY = f"leak-key-{secrets.token_hex(12)}"
REFUSED_KEY = f"leak-refused-{secrets.token_hex(12)}"
RECOMMEND = {"user_id": "u3", "candidate_ids": [f"i{n}" for n in range(40)], "k": 5}


# --------------------------------------------------------------------------- keys and tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64_int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks() -> dict[str, Any]:
    numbers = SIGNING_KEY.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig", "n": _b64_int(numbers.n), "e": _b64_int(numbers.e)}
    return {"keys": [jwk]}


def _token(expires_in: int) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": now, "exp": now + expires_in}
    header = {"alg": "RS256", "typ": "JWT", "kid": KID}
    signed = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    return f"{signed}.{_b64(SIGNING_KEY.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


GOOD_TOKEN = _token(3600)
EXPIRED_TOKEN = _token(-3600)  # beyond the edge's 60 s of clock skew


def _pem() -> str:
    return SIGNING_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _secrets(redis_password: str) -> dict[str, str]:
    """Each secret by what it is (the name says which one leaked)."""
    known = {
        "API key": API_KEY,
        "refused API key": REFUSED_KEY,
        "token": GOOD_TOKEN,
        "token signature": GOOD_TOKEN.rsplit(".", 1)[1],
        "expired token": EXPIRED_TOKEN,
        "expired token signature": EXPIRED_TOKEN.rsplit(".", 1)[1],
        "Redis password": redis_password,
    }
    body = [line for line in _pem().splitlines() if line and not line.startswith("-----")]
    known |= {f"private key PEM line {n}": line for n, line in enumerate(body)}
    return known


def leaks(text: str | bytes, known: dict[str, str]) -> list[str]:
    """The names of the secrets that appear in `text`."""
    data = text.encode() if isinstance(text, str) else text
    return [name for name, value in known.items() if value.encode() in data]


# --------------------------------------------------------------------------- the run


class RawTraceStore(TraceStore):
    """A TraceStore that also keeps every OTLP export as received, for a byte-level grep."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[bytes] = []

    def add_request(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        self.raw.append(request.SerializeToString())
        super().add_request(request)


@dataclass
class Surfaces:
    """What the mesh showed, by place; filled during and after the run."""

    redis_port: int = 0
    redis_password: str = ""
    up_output: str = ""
    logs: dict[str, bytes] = field(default_factory=dict)
    # Every other file of the data dir: path relative to it -> (contents, mode)
    data_files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    spans: list[bytes] = field(default_factory=list)
    metrics: dict[str, str] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    cmdlines: dict[int, bytes] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    subjects_in_spans: set[str] = field(default_factory=set)

    @property
    def known(self) -> dict[str, str]:
        return _secrets(self.redis_password)


def _start_up(data_dir: Path, secrets_dir: Path, ports: dict[str, int], otlp: str) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if not key.endswith("REDIS_URL")}
    argv = ["up", "--data-dir", str(data_dir), "--redis-port", str(ports["redis"])]
    argv += ["--edge-port", str(ports["edge"]), "--admin-port", str(ports["admin"])]
    argv += ["--port-base", str(free_port_block(1600)), "--replicas", "scoring=1"]
    argv += ["--supervisor-metrics-port", "0", "--workers", "1", "--no-bulk-lane"]
    argv += ["--api-key-file", str(secrets_dir / "api-keys"), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    argv += ["--jwt-jwks-file", str(secrets_dir / "jwks.json")]
    argv += ["--otlp-endpoint", otlp, "--trace-sampling", "1.0"]
    return subprocess.Popen(
        [sys.executable, "-m", "infermesh.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1", "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )


def _rest(port: int, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/recommend",
        data=json.dumps(RECOMMEND).encode(),
        headers={"content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, f"{response.headers}\n{response.read().decode(errors='replace')}"
    except urllib.error.HTTPError as error:
        return error.code, f"{error.headers}\n{error.read().decode(errors='replace')}"


def _grpc(port: int, metadata: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    request = gateway_pb2.RecommendRequest(
        user_id=RECOMMEND["user_id"], candidate_ids=RECOMMEND["candidate_ids"], k=RECOMMEND["k"]
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            reply, call = stub.Recommend.with_call(request, timeout=10, metadata=metadata)
            return "OK", f"{reply}\n{call.initial_metadata()}\n{call.trailing_metadata()}"
        except grpc.RpcError as error:
            details = f"{error.details()}\n{error.initial_metadata()}\n{error.trailing_metadata()}"  # type: ignore[attr-defined]
            return error.code().name, details  # type: ignore[attr-defined]


CALLS: dict[str, dict[str, str]] = {
    "api key": {"x-api-key": API_KEY},
    "api key as bearer": {"authorization": f"Bearer {API_KEY}"},
    "refused key": {"x-api-key": REFUSED_KEY},
    "refused key as bearer": {"authorization": f"Bearer {REFUSED_KEY}"},
    "token": {"authorization": f"Bearer {GOOD_TOKEN}"},
    "expired token": {"authorization": f"Bearer {EXPIRED_TOKEN}"},
}


def _send_traffic(edge: int, surfaces: Surfaces) -> None:
    for name, headers in CALLS.items():
        status, answer = _rest(edge, headers)
        surfaces.statuses[f"REST {name}"] = str(status)
        surfaces.answers.append(answer)
        code, answer = _grpc(edge, tuple(headers.items()))
        surfaces.statuses[f"gRPC {name}"] = code
        surfaces.answers.append(answer)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode(errors="replace")


def _metrics_ports(output: str) -> dict[str, int]:
    """The replicas' metrics ports `up` lists: `metrics  gateway-0=:31100  ...`."""
    line = next(line for line in output.splitlines() if line.strip().startswith("metrics "))
    return {name: int(port) for name, port in re.findall(r"(\S+)=:(\d+)", line)}


def _wait_for_spans(store: RawTraceStore, timeout: float) -> None:
    """Until the good token's request has its gateway span (the subject on it) and every hop,
    Envoy included (it exports every few seconds), has exported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = list(store.raw)
        if any(SUBJECT.encode() in part for part in raw) and _exporters(raw) >= EXPORTERS:
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory: pytest.TempPathFactory, reference_data: Path) -> Iterator[Surfaces]:
    work = tmp_path_factory.mktemp("secrets-never-leak")
    secrets_dir = work / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "api-keys").write_text(f"leak-test-client:{API_KEY}\n")
    (secrets_dir / "jwks.json").write_text(json.dumps(_jwks()))
    (secrets_dir / "signing-key.pem").write_text(_pem())
    data_dir = work / "data"
    for part in ("models", "index"):  # the trained ranker and its index: no retraining
        shutil.copytree(reference_data / part, data_dir / part)
    ports = {"redis": free_port(), "edge": free_port(), "admin": free_port()}
    store = RawTraceStore()
    surfaces = Surfaces(redis_port=ports["redis"])
    with OtlpReceiver(store) as receiver:
        up = _start_up(data_dir, secrets_dir, ports, receiver.endpoint)
        output: list[str] = []
        try:
            if not read_until(up, "Ctrl-C stops everything", output, 240):
                raise AssertionError("infermesh up did not come up:\n" + "".join(output))
            surfaces.redis_password = redis_password_file(data_dir, ports["redis"]).read_text().strip()
            _send_traffic(ports["edge"], surfaces)
            for name, port in _metrics_ports("".join(output)).items():
                surfaces.metrics[name] = _get(f"http://127.0.0.1:{port}/metrics")
            for page in ("/stats", "/config_dump"):  # the config: the API keys redacted (sensitive)
                surfaces.metrics[f"envoy {page}"] = _get(f"http://127.0.0.1:{ports['admin']}{page}")
            for pid in descendants(up.pid) | {up.pid}:
                with contextlib.suppress(OSError):  # gone meanwhile
                    surfaces.cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            _wait_for_spans(store, 30)
        finally:
            output.append(stop_reading(up, 90))
        surfaces.up_output = "".join(output)
        time.sleep(1.0)  # the last exports, flushed as the services stop
    surfaces.spans = list(store.raw)
    for path in data_dir.rglob("*"):
        if path.is_file():
            name = str(path.relative_to(data_dir))
            if name.startswith("logs/"):
                surfaces.logs[name] = path.read_bytes()
            else:
                surfaces.data_files[name] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    yield surfaces


# --------------------------------------------------------------------------- the checks


def _exporters(exports: list[bytes]) -> set[str]:
    """The service.name of every resource that exported spans."""
    names = set()
    for raw in exports:
        for resource in trace_service_pb2.ExportTraceServiceRequest.FromString(raw).resource_spans:
            names |= {a.value.string_value for a in resource.resource.attributes if a.key == "service.name"}
    return names


def test_the_run_exercised_every_kind_of_credential(surfaces: Surfaces) -> None:
    """Without this, an empty grep would prove nothing."""
    assert "infermesh is up" in surfaces.up_output, surfaces.up_output
    for name in CALLS:
        good = "refused" not in name and "expired" not in name
        assert surfaces.statuses[f"REST {name}"] == ("200" if good else "401"), (name, surfaces.statuses)
        assert surfaces.statuses[f"gRPC {name}"] == ("OK" if good else "UNAUTHENTICATED"), (name, surfaces.statuses)
    assert len(surfaces.redis_password) >= 32
    assert any(SUBJECT.encode() in raw for raw in surfaces.spans), "the good token's subject never reached a span"
    assert _exporters(surfaces.spans) >= EXPORTERS
    assert {"gateway-0", "features-0", "scoring-0", "ranking-0", "envoy /stats"} <= set(surfaces.metrics)
    assert "[redacted]" in surfaces.metrics["envoy /config_dump"]  # the API keys' place in Envoy's config
    assert any(b"celery" in cmdline or b"services.jobs.worker" in cmdline for cmdline in surfaces.cmdlines.values())
    assert any(b"redis-server" in cmdline for cmdline in surfaces.cmdlines.values())
    assert any(name.endswith("gateway-0.log") for name in surfaces.logs), sorted(surfaces.logs)


def test_no_secret_in_up_s_output(surfaces: Surfaces) -> None:
    assert leaks(surfaces.up_output, surfaces.known) == []


def test_no_secret_in_any_log_file(surfaces: Surfaces) -> None:
    found = {name: leaks(text, surfaces.known) for name, text in surfaces.logs.items()}
    assert {name: which for name, which in found.items() if which} == {}


def test_only_the_files_meant_for_secrets_hold_one_and_only_their_owner_reads_them(
    surfaces: Surfaces,
) -> None:
    meant = {f"redis-{surfaces.redis_port}.password": ["Redis password"], "redis/redis.conf": ["Redis password"]}
    meant["envoy.json"] = ["API key"]  # Envoy's api_key_auth filter needs the keys themselves
    found = {name: leaks(data, surfaces.known) for name, (data, _) in surfaces.data_files.items()}
    assert {name: which for name, which in found.items() if which} == meant
    assert {name: oct(surfaces.data_files[name][1]) for name in meant} == dict.fromkeys(meant, "0o600")


def test_no_secret_in_any_span(surfaces: Surfaces) -> None:
    assert [leaks(raw, surfaces.known) for raw in surfaces.spans if leaks(raw, surfaces.known)] == []


def test_no_secret_in_metrics_or_envoy_s_admin_pages(surfaces: Surfaces) -> None:
    found = {name: leaks(text, surfaces.known) for name, text in surfaces.metrics.items()}
    assert {name: which for name, which in found.items() if which} == {}


def test_no_secret_in_what_the_clients_were_told(surfaces: Surfaces) -> None:
    assert [leaks(answer, surfaces.known) for answer in surfaces.answers if leaks(answer, surfaces.known)] == []


def test_no_secret_on_any_command_line(surfaces: Surfaces) -> None:
    found = {pid: leaks(cmdline, surfaces.known) for pid, cmdline in surfaces.cmdlines.items()}
    assert {pid: (which, surfaces.cmdlines[pid]) for pid, which in found.items() if which} == {}
