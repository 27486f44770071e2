"""serve()'s observability on a real service process: one JSON log line per request with
trace ids, RED metrics with exemplars on /metrics, x-trace-id in the response, the server
span continuing the caller's traceparent, and spans flushed on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore
from infermesh.up.supervisor import free_port
from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]
RANK = "/infermesh.ranking.v1.RankingService/Rank"
ITEM_IDS = ["secret-item-0", "secret-item-1", "secret-item-2"]

# The ranking service, except that k=999 makes its handler crash (an unhandled exception).
PROBE = textwrap.dedent(
    """
    from services.genproto.infermesh.ranking.v1 import ranking_pb2_grpc

    from services.runtime.server import run
    from services.runtime.settings import load_settings
    from services.ranking.service import RankingService, RankingServicer, RankingSettings


    class Probe(RankingServicer):
        async def Rank(self, request, context):
            if request.k == 999:
                raise RuntimeError("probe handler crashed")
            return await super().Rank(request, context)


    class ProbeService(RankingService):
        def register(self, server):
            ranking_pb2_grpc.add_RankingServiceServicer_to_server(Probe(self.settings), server)


    def build():
        settings = load_settings(RankingSettings)
        return ProbeService(settings), settings


    run("ranking", build)
    """
)


@dataclass
class Probe:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    receiver: OtlpReceiver

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probe]:
    workdir = tmp_path_factory.mktemp("probe")
    script = workdir / "probe_service.py"
    script.write_text(PROBE)
    port, metrics_port = free_port(), free_port()
    log_path = workdir / "probe.log"
    receiver = OtlpReceiver(TraceStore()).start()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "RANKING_PORT": str(port),
        "RANKING_METRICS_PORT": str(metrics_port),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # No periodic export during the test: the spans can only arrive through the
        # flush on graceful shutdown.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "LOG_LEVEL": "INFO",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )
    probe = Probe(process, port, metrics_port, log_path, receiver)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield probe
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        receiver.stop()


def _rank(channel: grpc.Channel, k: int, scores: bytes, traceparent: str) -> tuple[grpc.StatusCode, dict[str, str]]:
    stub = ranking_pb2_grpc.RankingServiceStub(channel)
    request = ranking_pb2.RankRequest(
        item_ids=ITEM_IDS,
        scores=scores,
        item_categories=np.zeros(3, "<i4").tobytes(),
        k=k,
        max_per_category=5,
    )
    try:
        _, call = stub.Rank.with_call(request, timeout=5, metadata=[("traceparent", traceparent)])
    except grpc.RpcError as error:
        return error.code(), dict(error.trailing_metadata() or ())
    return grpc.StatusCode.OK, dict(call.trailing_metadata() or ())


TRACE_OK, TRACE_BAD, TRACE_CRASH = "1" * 32, "2" * 32, "3" * 32
CALLER_SPAN = "a" * 16


@pytest.fixture(scope="module")
def calls(probe: Probe) -> dict[str, tuple[grpc.StatusCode, dict[str, str]]]:
    good = np.array([0.1, 0.9, 0.5], "<f4").tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{probe.port}") as channel:
        return {
            "ok": _rank(channel, 2, good, f"00-{TRACE_OK}-{CALLER_SPAN}-01"),
            "bad": _rank(channel, 2, good[:4], f"00-{TRACE_BAD}-{CALLER_SPAN}-01"),
            "crash": _rank(channel, 999, good, f"00-{TRACE_CRASH}-{CALLER_SPAN}-01"),
        }


def test_statuses_and_trace_id_metadata(calls: dict) -> None:
    assert calls["ok"] == (grpc.StatusCode.OK, {"x-trace-id": TRACE_OK})
    assert calls["bad"][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert calls["crash"][0] == grpc.StatusCode.INTERNAL
    assert calls["bad"][1].get("x-trace-id") == TRACE_BAD
    assert calls["crash"][1].get("x-trace-id") == TRACE_CRASH


def _metrics(probe: Probe, openmetrics: bool) -> str:
    headers = {"accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    request = urllib.request.Request(f"http://127.0.0.1:{probe.metrics_port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def test_red_metrics_with_exemplars(probe: Probe, calls: dict) -> None:
    text = _metrics(probe, openmetrics=False)
    labels = 'grpc_method="Rank",grpc_service="infermesh.ranking.v1.RankingService",grpc_type="unary"'
    for code in ("OK", "InvalidArgument", "Internal"):
        assert f'grpc_server_handled_total{{grpc_code="{code}",{labels}}} 1.0' in text, text
    assert f"grpc_server_started_total{{{labels}}} 3.0" in text
    assert f"grpc_server_handling_seconds_count{{{labels}}} 3.0" in text
    assert f'grpc_server_handling_seconds_bucket{{{labels},le="0.00025"}}' in text  # millisecond buckets
    assert 'le="10.0"' in text
    assert "process_resident_memory_bytes" in text
    assert "grpc.health" not in text  # probes are not requests
    # Each bucket keeps its latest exemplar: the three calls' trace ids, whichever landed where.
    exemplars = set(
        re.findall(
            r'grpc_server_handling_seconds_bucket\{[^}]*\} \S+ # \{[^}]*trace_id="(\w+)"',
            _metrics(probe, openmetrics=True),
        )
    )
    assert exemplars and exemplars <= {TRACE_OK, TRACE_BAD, TRACE_CRASH}, exemplars


def test_one_log_line_per_request(probe: Probe, calls: dict) -> None:
    lines = probe.log_lines()
    rpc = [line for line in lines if line.get("message") == "rpc"]
    by_trace = {line["trace_id"]: line for line in rpc}
    assert len(rpc) == 3 and set(by_trace) == {TRACE_OK, TRACE_BAD, TRACE_CRASH}, rpc
    for trace_id, code, level in (  # codes spelled as the metrics' grpc_code label
        (TRACE_OK, "OK", "info"),
        (TRACE_BAD, "InvalidArgument", "info"),
        (TRACE_CRASH, "Internal", "error"),
    ):
        line = by_trace[trace_id]
        assert line["grpc_code"] == code and line["level"] == level
        assert line["grpc_method"] == RANK and line["service"] == "ranking"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert len(line["span_id"]) == 16 and line["span_id"] != CALLER_SPAN
    assert "scores has 4 bytes" in by_trace[TRACE_BAD]["grpc_message"]
    (crash,) = [line for line in lines if line.get("message") == "unhandled error"]
    assert crash["trace_id"] == TRACE_CRASH and crash["level"] == "error"
    frames = json.dumps(crash["exception"])
    assert "probe handler crashed" in frames and "RuntimeError" in frames  # stack trace, structured
    text = probe.log_path.read_text()
    assert "secret-item" not in text  # request payloads never reach the log


def test_spans_continue_the_callers_trace_and_flush_on_sigterm(probe: Probe, calls: dict) -> None:
    probe.process.send_signal(signal.SIGTERM)
    assert probe.process.wait(timeout=30) == 0, probe.log_path.read_text()
    trace = probe.receiver.store.wait_for(TRACE_OK, lambda t: len(t.spans) >= 2, timeout=10)
    assert trace is not None, "no spans: the shutdown flush did not export"
    (server,) = [s for s in trace.spans if s.kind == "SERVER"]
    assert server.name == RANK and server.service == "ranking" and server.parent_span_id == CALLER_SPAN
    stages = sorted(s.name for s in trace.spans if s.parent_span_id == server.span_id)
    assert stages == ["infermesh.ranking.top_k"]
    assert server.attributes["infermesh.items"] > 0  # the request's item count, on the server span
    crashed = probe.receiver.store.get(TRACE_CRASH)
    assert crashed is not None and any(s.status == "ERROR" for s in crashed.spans)
