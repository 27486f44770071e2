"""`infermesh plan`: works from a fresh clone (the published suite result), prefers this
machine's own, and says what is wrong with a file it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infermesh.bench import plan as plan_mod

SUITE = {
    "machine": {"cpu": "Test CPU", "cores": 4},
    "cpu_ms_per_request": {"gateway": 2.0, "features": 1.0, "scoring": 1.0, "ranking": 0.5, "redis": 0.3},
}


def test_a_fresh_clone_plans_from_the_published_measurement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no bench-results/ here, as in a fresh clone
    assert plan_mod.PUBLISHED_SUITE.is_file()
    assert plan_mod.main([]) == 0
    out = capsys.readouterr().out
    assert f"from {plan_mod.PUBLISHED_SUITE} (the published measurement" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["target_rps"] == plan_mod.DEFAULT_TARGET_RPS
    assert result["replicas"]["gateway"] >= 1 and result["machines"] >= 1


def test_this_machines_suite_result_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "bench-results" / "suite.json"
    own.parent.mkdir()
    own.write_text(json.dumps(SUITE))
    assert plan_mod.main(["--target-rps", "300", "--utilisation", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("from bench-results/suite.json\n") and "Test CPU, 4 cores" in out
    result = json.loads(out.strip().splitlines()[-1])
    # replicas = ceil(300 req/s x CPU ms / 1000 / 0.5); Redis is not a replica of ours.
    assert result["replicas"] == {"features": 1, "gateway": 2, "ranking": 1, "scoring": 1}
    assert result["cores"] == 5 and result["machines"] == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found: run `infermesh bench --suite` first"),
        ("{not json", "is not a readable suite result"),
        (json.dumps({"machine": {}}), "has no cpu_ms_per_request"),
    ],
)
def test_an_unusable_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    source = tmp_path / "suite.json"
    if content is not None:
        source.write_text(content)
    with pytest.raises(SystemExit) as exited:
        plan_mod.main(["--from", str(source)])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_numbers_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "suite.json"
    source.write_text(json.dumps(SUITE))
    for argv in (
        ["--utilisation", "0"],
        ["--utilisation", "1.5"],
        ["--target-rps", "-5"],
        ["--target-rps", "inf"],
        ["--cores-per-machine", "0"],
        ["--price-per-hour", "-1"],
    ):
        with pytest.raises(SystemExit) as exited:
            plan_mod.main(["--from", str(source), *argv])
        assert exited.value.code == 2
        assert argv[0] in capsys.readouterr().err  # the flag that was wrong, by name
