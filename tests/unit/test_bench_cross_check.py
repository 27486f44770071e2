"""The cross-check's inputs and its reading of wrk's and h2load's reports (captured from
real runs against a mesh); the runs themselves are a benchmark, not a test."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from infermesh.bench.cross_check import Row, parse_h2load, parse_wrk, table, write_inputs
from infermesh.bench.targets import reference_requests
from services.genproto.infermesh.gateway.v1 import gateway_pb2

WRK_OK = """Running 2s test @ http://127.0.0.1:21080/v1/recommend
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    18.89ms    2.81ms  28.16ms   75.24%
    Req/Sec   105.40      9.64   121.00     70.00%
  Latency Distribution
     50%   18.82ms
     75%   20.42ms
     90%   22.40ms
     99%   26.54ms
  210 requests in 2.00s, 361.98KB read
Requests/sec:    104.91
Transfer/sec:    180.84KB
"""

WRK_400 = """Running 1s test @ http://127.0.0.1:21080/v1/recommend
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.62ms  453.88us   6.59ms   87.79%
    Req/Sec     1.25k   143.07     1.57k    80.00%
  Latency Distribution
     50%    1.56ms
     75%    1.71ms
     90%    1.94ms
     99%    3.87ms
  1243 requests in 1.00s, 400.58KB read
  Non-2xx or 3xx responses: 1243
Requests/sec:   1241.73
Transfer/sec:    400.17KB
"""

H2LOAD_OK = """finished in 356.04ms, 112.35 req/s, 56.89KB/s
requests: 40 total, 40 started, 40 done, 40 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 40 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 20.26KB (20743) total, 370B (370) headers (space savings 94.07%), 17.70KB (18120) data
"""

# The same edge answering INVALID_ARGUMENT to every call: HTTP 200, no DATA, a grpc-status trailer.
H2LOAD_GRPC_ERRORS = """finished in 161.48ms, 1238.54 req/s, 53.04KB/s
requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 8.57KB (8771) total, 6.75KB (6916) headers (space savings 83.77%), 0B (0) data
"""

ANSWER = 453  # data bytes of the real answer to H2LOAD_OK's body: 18120 / 40


def h2load_log(durations_us: list[int]) -> str:
    return "".join(f"{1796690690376015 + i}\t200\t{d}\n" for i, d in enumerate(durations_us))


def test_wrk_report_is_read() -> None:
    row = parse_wrk(WRK_OK, 2)
    assert (row.client, row.route, row.concurrency) == ("wrk", "REST", 2)
    assert (row.rps, row.p50_ms, row.p99_ms, row.requests, row.failed) == (104.91, 18.82, 26.54, 210, 0)


def test_wrk_counts_http_errors_as_failed() -> None:
    row = parse_wrk(WRK_400, 2)
    assert (row.requests, row.failed, row.p50_ms) == (1243, 1243, 1.56)


def test_wrk_units_and_socket_errors() -> None:
    report = WRK_OK.replace("18.82ms", "850.00us").replace("26.54ms", "1.20s")
    report += "  Socket errors: connect 0, read 2, write 0, timeout 3\n"
    row = parse_wrk(report, 1)
    assert row.p50_ms == pytest.approx(0.85)
    assert row.p99_ms == pytest.approx(1200.0)
    assert row.failed == 5


def test_h2load_report_and_log_are_read() -> None:
    row = parse_h2load(H2LOAD_OK, h2load_log([10_000] * 98 + [50_000, 60_000]), 2, ANSWER)
    assert (row.client, row.route, row.rps, row.requests, row.failed) == ("h2load", "gRPC", 112.35, 40, 0)
    assert row.p50_ms == pytest.approx(10.0)
    assert row.p99_ms > 10.0


def test_h2load_grpc_errors_behind_http_200_count_as_failed() -> None:
    assert parse_h2load(H2LOAD_GRPC_ERRORS, h2load_log([3000] * 200), 4, ANSWER).failed == 200


def test_h2load_missing_answer_bytes_count_as_failed() -> None:
    half = H2LOAD_OK.replace("(18120) data", f"({20 * ANSWER}) data")
    assert parse_h2load(half, "", 2, ANSWER).failed == 20


def test_inputs_are_the_reference_requests(tmp_path: Path) -> None:
    requests = reference_requests(5)
    script, body = write_inputs(tmp_path, requests)
    frame = body.read_bytes()
    assert frame[0] == 0  # not compressed
    assert struct.unpack(">I", frame[1:5])[0] == len(frame) - 5
    message = gateway_pb2.RecommendRequest.FromString(frame[5:])
    assert (message.user_id, list(message.candidate_ids), message.k) == (
        requests[0]["user_id"],
        requests[0]["candidate_ids"],
        requests[0]["k"],
    )
    bodies = tmp_path / "bodies.jsonl"
    assert json.dumps(str(bodies)) in script.read_text()
    assert [json.loads(line) for line in bodies.read_text().splitlines()] == requests


def test_table_marks_missing_percentiles() -> None:
    text = table([Row("h2load", "gRPC", 1, 70.4, None, None, 0, 0)])
    assert text.splitlines()[-1] == "| h2load | gRPC | 1 | 70 | - | - | 0 | 0 |"
