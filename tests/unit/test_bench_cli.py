"""`infermesh bench`: a ramp's results are written before the plot, which can fail after
minutes of load (no matplotlib, a bad path); the REST target says what it needs."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest

from infermesh.bench import cli as bench_cli
from infermesh.bench import report

OUTCOME = {
    "steps": [{"offered_rps": 100.0, "rps": 100.0, "latency_ms": {"p50": 1.0, "p99": 2.0}, "errors": {}}],
    "max_sustainable_rps": 100.0,
}


@pytest.fixture
def canned_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ramp's measurement itself is not what is tested here."""
    monkeypatch.setattr(bench_cli, "_target_from_args", lambda args: None)
    monkeypatch.setattr(bench_cli, "ramp", lambda *args: OUTCOME)


@pytest.mark.usefixtures("canned_ramp")
def test_the_results_survive_a_plot_that_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_plot(*args: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_ramps", broken_plot)
    out = tmp_path / "ramp.json"
    with pytest.raises(RuntimeError, match="disk full"):
        bench_cli.main(["--mode", "ramp", "--out", str(out), "--plot", str(tmp_path / "ramp.png"), "--no-progress"])
    assert json.loads(out.read_text())["ramp"] == OUTCOME


@pytest.mark.usefixtures("canned_ramp")
def test_a_plot_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "ramp.json"
    argv = ["--mode", "ramp", "--out", str(out), "--plot", str(tmp_path / "p.png"), "--no-progress"]
    assert bench_cli.main(argv) == 1
    assert "pip install 'infermesh[bench]'" in capsys.readouterr().err
    assert json.loads(out.read_text())["ramp"] == OUTCOME


@pytest.mark.usefixtures("canned_ramp")
def test_the_plot_is_drawn_after_the_results(tmp_path: Path) -> None:
    out, plot = tmp_path / "ramp.json", tmp_path / "ramp.png"
    assert bench_cli.main(["--mode", "ramp", "--out", str(out), "--plot", str(plot), "--no-progress"]) == 0
    assert out.is_file() and plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.usefixtures("canned_ramp")
def test_a_bare_plot_ramps_and_draws_to_the_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert bench_cli.main(["--target", "rest", "--plot", "--no-progress"]) == 0
    assert (tmp_path / bench_cli.DEFAULT_PLOT).read_bytes().startswith(b"\x89PNG")


def test_a_plot_of_a_closed_loop_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_cli.main(["--mode", "closed", "--plot"])
    assert exited.value.code == 2
    assert "--plot draws a ramp: use --mode ramp" in capsys.readouterr().err


def test_a_ramp_whose_lowest_rate_missed_says_so_and_what_to_try(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missed = {
        "steps": [
            {"offered_rps": 100.0, "rps": 98.0, "latency_ms": {"p50": 15.6, "p99": 31.0}, "errors": {}},
            {"offered_rps": 200.0, "rps": 198.0, "latency_ms": {"p50": 25.9, "p99": 55.7}, "errors": {}},
        ],
        "max_sustainable_rps": 0.0,
    }
    monkeypatch.setattr(bench_cli, "_target_from_args", lambda args: None)
    monkeypatch.setattr(bench_cli, "ramp", lambda *args: missed)
    assert bench_cli.main(["--mode", "ramp", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "max sustainable open-loop rate with p99 <= 25 ms: 0 req/s: the lowest rate tried, 100 req/s" in out
    assert "had p99 31.0 ms" in out and "--rates 25,50,100" in out


@pytest.mark.usefixtures("canned_ramp")
def test_a_ramp_that_held_somewhere_prints_the_plain_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_cli.main(["--mode", "ramp", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "max sustainable open-loop rate with p99 <= 25 ms: 100 req/s"
