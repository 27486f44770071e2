"""`infermesh traces` (OTLP receiver + local trace view) and `infermesh up --otlp-endpoint`
as a user runs them: the mesh's spans, Envoy's included, show up in the view."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from infermesh.cli import main as infermesh_main
from infermesh.up.supervisor import free_port, free_port_block
from tests.conftest import RedisServer
from tests.processes import read_until, stop_reading

pytestmark = pytest.mark.timeout(300)

SERVICES = {"envoy", "gateway", "features", "scoring", "ranking"}


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "infermesh.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    lines: list[str] = []
    read_until(process, marker, lines, timeout)
    return "".join(lines)


def _get_json(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


@pytest.fixture()
def trace_view() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    otlp, http = free_port(), free_port()
    process = _start(["traces", "--otlp-port", str(otlp), "--http-port", str(http)])
    try:
        text = _read_until(process, "Ctrl-C stops it", 30)
        assert f"http://127.0.0.1:{http}" in text and f"http://127.0.0.1:{otlp}" in text, text
        yield process, otlp, http
    finally:
        rest = stop_reading(process, 60)
        assert process.returncode == 0, rest


def test_up_exports_to_the_trace_view(
    trace_view: tuple[subprocess.Popen[str], int, int],
    redis_server: RedisServer,
    reference_data: Path,
    tmp_path: Path,
) -> None:
    _, otlp, http = trace_view
    data_dir = tmp_path / "data"
    shutil.copytree(reference_data / "models", data_dir / "models")  # skip retraining
    edge, base = free_port(), free_port_block(1500)  # replicas and their metrics ports
    up = _start(
        [
            "up",
            "--data-dir",
            str(data_dir),
            "--redis-url",
            redis_server.url,
            "--edge-port",
            str(edge),
            "--admin-port",
            str(free_port()),
            "--port-base",
            str(base),
            "--replicas",
            "scoring=1",
            "--otlp-endpoint",
            f"http://127.0.0.1:{otlp}",
            "--trace-sampling",
            "1.0",
        ]
    )
    try:
        text = _read_until(up, "Ctrl-C stops everything", 150)
        assert "infermesh is up" in text, text
        assert f"traces (OTLP)      http://127.0.0.1:{otlp}" in text, text
        # Metrics ports: replica port + 1000 (the default offset), listed for a scraper.
        assert f"gateway-0=:{base + 100 + 1000}" in text, text

        body = json.dumps({"user_id": "u9", "candidate_ids": [f"i{n}" for n in range(200)], "k": 20}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{edge}/v1/recommend", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            trace_id = response.headers["x-trace-id"]
            assert json.loads(response.read())["trace_id"] == trace_id

        deadline = time.monotonic() + 30  # the SDK's default export delay is 5 s
        doc: object = None
        while time.monotonic() < deadline:
            status, doc = _get_json(f"http://127.0.0.1:{http}/api/traces/{trace_id}")
            if status == 200 and isinstance(doc, dict) and set(doc["services"]) == SERVICES and doc["spans"] >= 18:
                break
            time.sleep(0.5)
        assert isinstance(doc, dict) and set(doc["services"]) == SERVICES, doc
        assert doc["spans"] >= 18
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/trace/{trace_id}", timeout=5) as page:
            html = page.read().decode()
        assert "edge ingress" in html and "infermesh.scoring.queue" in html
        with urllib.request.urlopen(f"http://127.0.0.1:{base + 100 + 1000}/metrics", timeout=5) as metrics:
            assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Recommend"' in metrics.read().decode()
    finally:
        rest = stop_reading(up, 60)
    assert up.returncode == 0, rest
    assert "stopped." in rest


def test_up_rejects_both_tracing_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        infermesh_main(["up", "--trace-view", "--otlp-endpoint", "http://127.0.0.1:4317"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_telemetry_env_for_up() -> None:
    from infermesh.cli import _telemetry_env, build_parser

    args = build_parser().parse_args(["up", "--trace-view", "--trace-sampling", "0.01"])
    env = _telemetry_env(args, "http://127.0.0.1:14317")
    # The endpoint is the base URL; the shell's traces-specific one (used as it is) is emptied,
    # which is unset; the local view's receiver speaks OTLP/gRPC.
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:14317"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == ""
    assert (env["OTEL_EXPORTER_OTLP_PROTOCOL"], env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"]) == ("grpc", "")
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.01"
    assert env["OTEL_BSP_SCHEDULE_DELAY"] == os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500")
    args = build_parser().parse_args(["up", "--trace-sampling", "2"])
    with pytest.raises(ValueError, match="0..1"):
        _telemetry_env(args, None)
