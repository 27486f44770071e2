"""`python -m infermesh.bench.rpc_floor` runs end to end against a real server subprocess and a
real Envoy (numbers are not asserted: a benchmark is not a timing test)."""

from __future__ import annotations

import asyncio
import json

import pytest

from infermesh.bench import rpc_floor
from infermesh.up.supervisor import free_port


def test_rpc_floor_measures_direct_and_envoy_calls(capsys: pytest.CaptureFixture[str]) -> None:
    assert rpc_floor.main(["--seconds", "0.3", "--concurrency", "1,2", "--payload-bytes", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(row["path"], row["concurrency"]) for row in report["rows"]] == [
        ("direct", 1),
        ("direct", 2),
        ("envoy", 1),
        ("envoy", 2),
    ]
    for row in report["rows"]:
        assert row["calls_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["client_us_per_call"] > 0 and row["server_us_per_call"] > 0
        assert (row["envoy_us_per_call"] is None) == (row["path"] == "direct")
    floor = report["recommend_floor"]
    envoy_rows = report["rows"][2:]
    assert floor["p50_ms_at_c1"] == pytest.approx(4 * envoy_rows[0]["p50_ms"])
    per_call = (
        envoy_rows[1]["client_us_per_call"] + envoy_rows[1]["server_us_per_call"] + envoy_rows[1]["envoy_us_per_call"]
    )
    assert floor["cpu_ms_per_request"] == pytest.approx(4 * per_call / 1000)


def test_idle_rows_measure_each_path_after_a_quiet_spell_and_leave_the_floor_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--seconds", "0.3", "--concurrency", "2", "--payload-bytes", "64", "--idle-ms", "20", "--json"]
    assert rpc_floor.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [(row["path"], row["concurrency"]) for row in report["rows"]]
    assert rows == [
        ("direct", 2),
        ("direct, 20 ms idle before each call", 1),
        ("envoy", 2),
        ("envoy, 20 ms idle before each call", 1),
    ]
    idle = report["rows"][3]
    # 0.3 s of calls each after 20 ms asleep: at most 15 calls, and each was measured
    assert 0 < idle["calls_per_s"] <= 1 / 0.02 and 0 < idle["p50_ms"] <= idle["p99_ms"]
    # the floor still comes from the back-to-back Envoy row alone
    assert report["recommend_floor"]["p50_ms_at_c1"] == pytest.approx(4 * report["rows"][2]["p50_ms"])


def test_rpc_floor_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit, match="integers"):
        rpc_floor.main(["--concurrency", "one"])
    with pytest.raises(SystemExit, match=">= 1"):
        rpc_floor.main(["--concurrency", "0"])
    with pytest.raises(SystemExit, match="idle-ms"):
        rpc_floor.main(["--idle-ms", "-1"])


def test_a_target_that_never_answers_stops_with_its_log(tmp_path) -> None:
    log = tmp_path / "envoy.log"
    log.write_text("[critical] cannot bind 127.0.0.1: address in use\n")
    with pytest.raises(SystemExit, match="did not answer within 1 s(.|\n)*address in use"):
        asyncio.run(rpc_floor._ready(f"127.0.0.1:{free_port()}", log, timeout=1))
