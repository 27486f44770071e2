"""`infermesh bench` runs for two seconds against the mesh and writes valid JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infermesh.up.supervisor import Mesh


def run_bench(out: Path, *options: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`infermesh bench` as a user runs it, after a 0.2 s warm-up, its results written to `out`."""
    return subprocess.run(
        [sys.executable, "-m", "infermesh.cli", "bench", *options,
         "--warmup", "0.2", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip


def test_bench_two_seconds_writes_json(mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    address = f"127.0.0.1:{mesh.topology.edge_port}"
    completed = run_bench(
        out, "--target", "grpc", "--address", address, "--concurrency", "2", "--duration", "2", timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(out.read_text())
    result = document["result"]
    assert result["ok"] > 0 and result["errors"] == {}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert document["machine"]["cores"] >= 1


def test_a_rest_ramp_writes_its_results_then_its_plot(mesh: Mesh, tmp_path: Path) -> None:
    """The Quick start's `infermesh bench --target rest --plot`, short: the bench extra's
    aiohttp drives the REST edge, matplotlib draws the ramp, after the results are on disk."""
    out, plot = tmp_path / "ramp.json", tmp_path / "ramp.png"
    url = f"http://127.0.0.1:{mesh.topology.edge_port}/v1/recommend"
    completed = run_bench(
        out, "--target", "rest", "--url", url, "--plot", str(plot), "--rates", "20,40", "--duration", "1", timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    steps = json.loads(out.read_text())["ramp"]["steps"]
    assert [step["offered_rps"] for step in steps] == [20.0, 40.0]
    assert all(step["ok"] > 0 and not step["errors"] for step in steps)
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert completed.stdout.index(f"wrote {out}") < completed.stdout.index(f"wrote {plot}")
