"""A job's input is checked whole before anything is stored; errors name the line or row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.jobs.inputs import format_of, read_file, validate
from services.jobs.store import JobStatus
from services.runtime.errors import InvalidArgument

GOOD = {"user_id": "u1", "candidate_ids": ["i1", "i2"], "k": 2}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_json_lines_parse_with_default_and_given_request_ids(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "job.jsonl", [json.dumps(GOOD), "", json.dumps({**GOOD, "request_id": "mine", "user_id": "u2"})]
    )
    requests = read_file(path, max_requests=10)
    assert [r.request_id for r in requests] == ["r0", "mine"]
    second = gateway_pb2.RecommendRequest.FromString(requests[1].payload)
    assert second.user_id == "u2" and list(second.candidate_ids) == ["i1", "i2"] and second.k == 2


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        (json.dumps({"candidate_ids": ["i1"]}), "line 2: user_id is missing"),
        (json.dumps({"user_id": "u1"}), "line 2: candidate_ids is missing"),
        (json.dumps({**GOOD, "k": 0}), "line 2: k must be between 1 and 1000"),
        (json.dumps({**GOOD, "k": "many"}), "line 2:"),
        (json.dumps({**GOOD, "colour": "red"}), "line 2:"),
        (json.dumps({**GOOD, "candidate_ids": ["i1", ""]}), "line 2: candidate_ids holds an empty id"),
        (json.dumps([1, 2]), "line 2: expected a JSON object"),
        (json.dumps({**GOOD, "request_id": "r0"}), "line 2: request_id 'r0' is also the id of line 1"),
    ],
)
def test_a_bad_line_refuses_the_job_naming_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(tmp_path / "job.jsonl", [json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(InvalidArgument) as caught:
        read_file(path, max_requests=10)
    assert str(caught.value).startswith(message), str(caught.value)


def test_parquet_rows_are_named_by_row(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([GOOD, {**GOOD, "user_id": ""}])
    pq.write_table(table, tmp_path / "job.parquet")
    with pytest.raises(InvalidArgument, match="^row 1: user_id is missing or empty"):
        read_file(tmp_path / "job.parquet", max_requests=10)
    pq.write_table(
        pa.Table.from_pylist([{**GOOD, "request_id": None}, {**GOOD, "request_id": "x"}]), tmp_path / "ok.parquet"
    )
    assert [r.request_id for r in read_file(tmp_path / "ok.parquet", max_requests=10)] == ["r0", "x"]


def test_limits_empty_jobs_and_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="at most 2 requests"):
        validate([GOOD, GOOD, GOOD], max_requests=2)
    with pytest.raises(InvalidArgument, match="no requests"):
        validate([], max_requests=2)
    with pytest.raises(InvalidArgument, match="unknown job file format"):
        format_of("job.csv")
    with pytest.raises(InvalidArgument, match="no such job file"):
        read_file(tmp_path / "missing.jsonl", max_requests=2)


def test_status_reports_throughput_and_eta() -> None:
    status = JobStatus(
        job_id="j", state="running", total=100, succeeded=20, failed=5, created_at=0.0, started_at=1.0,
        finished_at=None, results="r.jsonl", results_format="jsonl", source="", error="", trace_id="",
    )  # fmt: skip
    assert status.done == 25
    assert status.throughput > 0
    assert status.eta_seconds == pytest.approx(75 / status.throughput, rel=0.01)
