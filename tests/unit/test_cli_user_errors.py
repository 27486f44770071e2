"""Mistakes a user makes on the command line get one clear line and an exit status, never a
traceback: a bad seed, a file where a directory belongs, a reader that leaves the pipe early."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from infermesh.cli import main as infermesh
from infermesh.cli_help import number, whole_number

ROOT = Path(__file__).resolve().parents[2]


def test_seed_refuses_a_negative_seed_and_a_file_as_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        infermesh(["seed", "--seed", "-1"])
    assert exited.value.code == 2 and "give a whole number from 0" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    # Refused before any training or Redis work (that port has no Redis).
    assert infermesh(["seed", "--data-dir", str(tmp_path / "file"), "--redis-url", "redis://127.0.0.1:1"]) == 1
    assert (
        capsys.readouterr().err.strip() == f"infermesh seed: --data-dir {tmp_path / 'file'} is a file, not a directory"
    )


def test_a_closed_pipe_ends_a_command_without_a_traceback() -> None:
    # `infermesh envoy render | head -1`: the reader is gone before the config is written.
    process = subprocess.Popen(
        [sys.executable, "-m", "infermesh.cli", "envoy", "render"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_number_types_refuse_what_is_out_of_range_or_not_finite() -> None:
    assert whole_number(1)("3") == 3 and number(above=0)("0.5") == 0.5 and number(at_least=0)("0") == 0
    for parse, text in (
        (whole_number(1), "0"),
        (whole_number(0), "-1"),
        (whole_number(0), "1.5"),
        (number(above=0), "0"),
        (number(above=0), "nan"),
        (number(at_least=0), "inf"),
        (number(at_least=0), "-1"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match="give a"):
            parse(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--target-rps", "nan"],
        ["plan", "--price-per-hour", "-1"],
        ["models", "quantize", "--seconds", "0"],
        ["models", "quantize", "--queries", "0"],
        ["models", "quantize", "--candidates", "5"],  # NDCG@20 needs 20
        ["drift", "baseline", "--bins", "1", "--data", "x.parquet"],
        ["envoy", "render", "--edge-port", "70000"],
        ["up", "--admin-port", "0"],
        ["features", "ingest", "user", "x.csv", "--batch-rows", "0"],
        ["jobs", "wait", "job-1", "--timeout", "-1"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        infermesh(argv)
    assert exited.value.code == 2 and "give a" in capsys.readouterr().err


def test_certs_hosts_are_ip_addresses_or_dns_names() -> None:
    from infermesh.certs import host_name

    for ok in ("mesh.example.com", "10.0.0.1", "::1", "*.svc.cluster.local", "edge-1"):
        assert host_name(ok) == ok
    for bad in ("", "bad host!", "-x.com", "a..b", "x" * 300):
        with pytest.raises(argparse.ArgumentTypeError, match="neither an IP address nor a DNS name"):
            host_name(bad)


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ("running", "written when the job completes"),
        ("cancelled", "not written: the job cancelled"),
        ("failed", "not written: the job failed"),
    ],
)
def test_job_status_says_whether_results_are_coming(state: str, says: str) -> None:
    from infermesh.jobs.cli import describe
    from services.jobs.store import JobStatus

    status = JobStatus("job-1", state, 10, 4, 1, 1.0, 2.0, None, "/tmp/r.jsonl", "jsonl", "api", "", "")
    assert says in describe(status)
