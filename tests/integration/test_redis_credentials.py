"""Redis with credentials and TLS, against a real redis-server of the test's own.

The server requires a password of its default user and has an ACL user; a second one speaks
only TLS (certificates from `infermesh certs`) and requires a client certificate. The
services and tools connect with good credentials, and with a wrong or missing password stop
at start with one line naming the variable to fix: exit code non-zero, no traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from pydantic import SecretStr

from infermesh.certs import generate
from infermesh.settings import local_redis_password, redis_password_file, tools_redis_target
from infermesh.up.supervisor import free_port, start_redis
from infermesh.workload import modelgen
from infermesh.workload.catalog import generate_catalog
from infermesh.workload.seed import load_into_redis, seed_all
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.jobs.queue import celery_app
from services.jobs.settings import JobsSettings
from services.runtime.redis_connection import RedisCredentialsError, RedisTarget
from tests.processes import running_service, stop, wait_until
from tests.scoring_server import running_scoring, server_settings

DEFAULT_PASSWORD = "default-secret-4f2a"
APP_USER, APP_PASSWORD = "app", "app-secret-9c1e"
WRONG_PASSWORD = "not-the-password-77"


@dataclass(frozen=True)
class SecuredRedis:
    url: str
    process: subprocess.Popen[bytes]


def _start(workdir: Path, config: list[str]) -> subprocess.Popen[bytes]:
    """redis-server from a config file (mode 0600): the passwords stay off its command line."""
    path = workdir / "redis.conf"
    path.write_text("\n".join(["bind 127.0.0.1", 'save ""', "appendonly no", f"dir {workdir}", *config]) + "\n")
    path.chmod(0o600)
    return subprocess.Popen(
        ["redis-server", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )


def _acl() -> list[str]:
    return [f"requirepass {DEFAULT_PASSWORD}", f"user {APP_USER} on >{APP_PASSWORD} ~* &* +@all"]


def _answers(target: RedisTarget) -> bool:
    try:
        with target.client(socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredRedis]:
    workdir = tmp_path_factory.mktemp("redis-acl")
    port = free_port()
    process = _start(workdir, [f"port {port}", *_acl()])
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _answers(RedisTarget(url, password=SecretStr(DEFAULT_PASSWORD))), 10, "redis-server up")
        yield SecuredRedis(url, process)
    finally:
        stop(process)


@dataclass(frozen=True)
class TlsRedis:
    url: str
    certs: Path


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    workdir = tmp_path_factory.mktemp("redis-tls")
    certs = generate(workdir / "certs")  # edge.crt names 127.0.0.1: Redis's server certificate here
    port = free_port()
    process = _start(
        workdir,
        [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {certs.edge_cert}",
            f"tls-key-file {certs.edge_key}",
            f"tls-ca-cert-file {certs.ca_cert}",
            "tls-auth-clients yes",
            *_acl(),
        ],
    )
    url = f"rediss://127.0.0.1:{port}/0"
    target = RedisTarget(
        url,
        username=APP_USER,
        password=SecretStr(APP_PASSWORD),
        tls_ca_file=str(certs.ca_cert),
        tls_cert_file=str(certs.client_cert),
        tls_key_file=str(certs.client_key),
    )
    try:
        wait_until(lambda: _answers(target), 10, "redis-server (TLS) up")
        yield TlsRedis(url, workdir / "certs")
    finally:
        stop(process)


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env={**os.environ, "OTEL_TRACES_EXPORTER": "none", **env}, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------------- good credentials


def test_the_default_user_and_an_acl_user_with_their_passwords_read_and_write(secured: SecuredRedis) -> None:
    for username, password in (("", DEFAULT_PASSWORD), (APP_USER, APP_PASSWORD)):
        settings = JobsSettings(redis_url=secured.url, redis_username=username, redis_password=password)
        target = settings.redis()
        target.check()
        with target.client() as client:
            client.set(f"test:credentials:{username or 'default'}", "ok")
            assert client.get(f"test:credentials:{username or 'default'}") == b"ok"


def test_the_features_service_becomes_serving_with_the_acl_user(secured: SecuredRedis, tmp_path: Path) -> None:
    target = RedisTarget(secured.url, username=APP_USER, password=SecretStr(APP_PASSWORD))
    with target.client() as client:  # a catalog, so that features becomes ready
        load_into_redis(client, generate_catalog(seed=3, n_users=5, n_items=50, n_categories=4), progress=False)
    env = {
        "FEATURES_REDIS_URL": secured.url,
        "FEATURES_REDIS_USERNAME": APP_USER,
        "FEATURES_REDIS_PASSWORD": APP_PASSWORD,
    }
    with running_service("features", env, tmp_path / "features.log") as service:
        assert service.serving()
    assert APP_PASSWORD not in (tmp_path / "features.log").read_text()


def test_celery_reaches_its_broker_with_the_jobs_credentials(secured: SecuredRedis) -> None:
    settings = JobsSettings(redis_url=secured.url, redis_username=APP_USER, redis_password=APP_PASSWORD)
    app = celery_app(settings)
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        # Celery shows its broker without the password (its banner, its errors).
        assert APP_PASSWORD not in connection.as_uri()


# ---------------------------------------------------------------------------- refused credentials


@pytest.mark.parametrize(
    ("service", "module", "extra"),
    [
        ("features", "services.features", {}),
        ("ranking", "services.ranking", {}),
        ("jobs", "services.jobs", {}),
        ("jobs", "services.jobs.worker", {}),
    ],
)
def test_a_wrong_password_stops_each_service_at_start_naming_the_variable(
    secured: SecuredRedis, service: str, module: str, extra: dict[str, str]
) -> None:
    prefix = service.upper()
    result = _run(
        [sys.executable, "-m", module],
        {
            f"{prefix}_PORT": str(free_port()),
            f"{prefix}_REDIS_URL": secured.url,
            f"{prefix}_REDIS_PASSWORD": WRONG_PASSWORD,
            **extra,
        },
    )
    assert result.returncode != 0
    assert f"refused the credentials in {prefix}_REDIS_PASSWORD" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert WRONG_PASSWORD not in result.stderr + result.stdout


def test_a_wrong_password_stops_scoring_with_a_response_cache_naming_the_variable(
    secured: SecuredRedis, tmp_path: Path
) -> None:
    result = _run(
        [sys.executable, "-m", "services.scoring"],
        {
            "SCORING_PORT": str(free_port()),
            "SCORING_MODEL_REPOSITORY": str(_cached_model_repository(tmp_path)),
            "SCORING_CACHE_REDIS_URL": secured.url,
            "SCORING_REDIS_PASSWORD": WRONG_PASSWORD,
        },
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "refused the credentials in SCORING_REDIS_PASSWORD" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert WRONG_PASSWORD not in result.stderr + result.stdout


async def test_the_scoring_response_cache_stores_and_hits_with_the_acl_user(
    secured: SecuredRedis, tmp_path: Path
) -> None:
    settings = server_settings(
        _cached_model_repository(tmp_path),
        cache_redis_url=secured.url,
        redis_username=APP_USER,
        redis_password=APP_PASSWORD,
    )
    request = pb.ModelInferRequest(model_name="cached")
    request.inputs.add(name="features", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(np.ones((2, 64), np.float32).tobytes())
    target = RedisTarget(secured.url, username=APP_USER, password=SecretStr(APP_PASSWORD))
    with target.client() as client:
        client.delete(*client.keys("scoring:cache:cached:*") or ["scoring:cache:none"])
        async with running_scoring(settings) as service:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.settings.port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                first = await stub.ModelInfer(request)
                for _ in range(200):  # the write is in the background, in this event loop
                    if client.keys("scoring:cache:cached:1:*"):
                        break
                    await asyncio.sleep(0.05)
                second = await stub.ModelInfer(request)
                stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="cached"))
    assert second.raw_output_contents == first.raw_output_contents
    assert stats.model_stats[0].inference_stats.cache_hit.count == 1


def _cached_model_repository(root: Path) -> Path:
    """One model with the response cache on."""
    modelgen.write_config(root, "cached", {"max_batch_size": 8, "response_cache": {"enable": True, "ttl_seconds": 60}})
    modelgen.write_version(root, "cached", 1, modelgen.mlp_model(1))
    return root


def test_a_missing_password_says_which_variable_to_set(secured: SecuredRedis) -> None:
    result = _run(
        [sys.executable, "-m", "services.features"],
        {"FEATURES_PORT": str(free_port()), "FEATURES_REDIS_URL": secured.url},
    )
    assert result.returncode != 0
    assert "requires a password and none is set: set FEATURES_REDIS_PASSWORD" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_wrong_acl_user_password_names_the_user_variable(secured: SecuredRedis) -> None:
    target = RedisTarget(
        secured.url,
        username=APP_USER,
        password=SecretStr(WRONG_PASSWORD),
        username_variable="RANKING_REDIS_USERNAME",
        password_variable="RANKING_REDIS_PASSWORD",
    )
    with pytest.raises(RedisCredentialsError) as refused:
        target.check()
    message = str(refused.value)
    assert "RANKING_REDIS_PASSWORD" in message and "RANKING_REDIS_USERNAME" in message
    assert WRONG_PASSWORD not in message and "\n" not in message


def test_the_seed_tool_gives_one_line_naming_its_variable(secured: SecuredRedis, tmp_path: Path) -> None:
    result = _run(
        [sys.executable, "-m", "infermesh.cli", "seed", "--data-dir", str(tmp_path), "--redis-url", secured.url],
        {"INFERMESH_REDIS_PASSWORD": WRONG_PASSWORD},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the credentials in INFERMESH_REDIS_PASSWORD" in lines[0], result.stderr
    assert WRONG_PASSWORD not in result.stderr + result.stdout


def test_bench_s_monolith_target_gives_one_line_naming_its_variable(secured: SecuredRedis, tmp_path: Path) -> None:
    argv = ["bench", "--target", "monolith", "--data-dir", str(tmp_path), "--redis-url", secured.url]
    result = _run([sys.executable, "-m", "infermesh.cli", *argv], {"INFERMESH_REDIS_PASSWORD": WRONG_PASSWORD})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the credentials in INFERMESH_REDIS_PASSWORD" in lines[0], result.stderr
    assert WRONG_PASSWORD not in result.stderr + result.stdout


def test_bench_s_monolith_target_finds_the_password_up_keeps_in_the_data_dir(
    secured: SecuredRedis, tmp_path: Path
) -> None:
    target = RedisTarget(secured.url, password=SecretStr(DEFAULT_PASSWORD))
    seed_all(tmp_path, target, progress=False, train_steps=50)  # the reference catalog, a quick model
    port = int(secured.url.rsplit(":", 1)[1].split("/")[0])
    redis_password_file(tmp_path, port).write_text(DEFAULT_PASSWORD + "\n")  # as `up` keeps it
    out = tmp_path / "bench.json"
    argv = ["bench", "--target", "monolith", "--data-dir", str(tmp_path), "--redis-url", secured.url]
    argv += ["--duration", "0.5", "--warmup", "0", "--no-progress", "--out", str(out)]
    result = _run([sys.executable, "-m", "infermesh.cli", *argv], {})
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())["result"]
    assert measured["ok"] > 0 and not measured["errors"], measured
    assert DEFAULT_PASSWORD not in result.stdout + result.stderr + out.read_text()


def test_an_unreachable_redis_is_not_a_credentials_error(tmp_path: Path) -> None:
    # The services degrade and retry while Redis is down: only refused credentials stop them.
    RedisTarget(f"redis://127.0.0.1:{free_port()}/0", password=SecretStr("x")).check(timeout_seconds=0.5)


# ---------------------------------------------------------------------------- TLS


def test_tls_with_the_ca_and_a_client_certificate(tls_redis: TlsRedis) -> None:
    certs = tls_redis.certs
    settings = JobsSettings(
        redis_url=tls_redis.url,
        redis_username=APP_USER,
        redis_password=APP_PASSWORD,
        redis_tls_ca_file=str(certs / "ca.crt"),
        redis_tls_cert_file=str(certs / "client.crt"),
        redis_tls_key_file=str(certs / "client.key"),
    )
    target = settings.redis()
    target.check()
    with target.client() as client:
        client.set("test:tls", "ok")
        assert client.get("test:tls") == b"ok"
    # Celery over the same TLS: broker_use_ssl from the same files.
    with celery_app(settings).connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)


def test_tls_without_a_client_certificate_is_refused(tls_redis: TlsRedis) -> None:
    target = RedisTarget(
        tls_redis.url,
        username=APP_USER,
        password=SecretStr(APP_PASSWORD),
        tls_ca_file=str(tls_redis.certs / "ca.crt"),
    )
    with target.client(socket_timeout=2, socket_connect_timeout=2) as client, pytest.raises(redis.ConnectionError):
        client.ping()


def test_tls_rejects_a_server_certificate_from_another_ca(tls_redis: TlsRedis, tmp_path: Path) -> None:
    other = generate(tmp_path / "other")
    target = RedisTarget(
        tls_redis.url,
        username=APP_USER,
        password=SecretStr(APP_PASSWORD),
        tls_ca_file=str(other.ca_cert),
        tls_cert_file=str(tls_redis.certs / "client.crt"),
        tls_key_file=str(tls_redis.certs / "client.key"),
    )
    with target.client(socket_timeout=2, socket_connect_timeout=2) as client, pytest.raises(redis.ConnectionError):
        client.ping()


# ---------------------------------------------------------------------------- `infermesh up`'s Redis


def test_up_s_redis_gets_its_password_from_a_private_file_not_its_command_line(tmp_path: Path) -> None:
    port = free_port()
    password = local_redis_password(tmp_path, port)
    assert local_redis_password(tmp_path, port) == password  # kept across starts
    path = redis_password_file(tmp_path, port)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    process = start_redis(tmp_path, port, tmp_path / "logs", persist=False, password=password)
    try:
        config = tmp_path / "redis" / "redis.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert password.encode() not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
        url = f"redis://127.0.0.1:{port}/0"
        with pytest.raises(RedisCredentialsError):
            RedisTarget(url).check()
        # A tool pointed at it finds the password `up` keeps in the data dir.
        target = tools_redis_target(url, tmp_path)
        target.check()
        assert target.password.get_secret_value() == password
    finally:
        stop(process)
