"""`infermesh bench` runs for two seconds against the mesh and writes valid JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from infermesh.up.supervisor import Mesh


def test_bench_two_seconds_writes_json(mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "infermesh.cli", "bench", "--target", "grpc",
         "--address", f"127.0.0.1:{mesh.topology.edge_port}", "--concurrency", "2",
         "--duration", "2", "--warmup", "0.2", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(out.read_text())
    result = document["result"]
    assert result["ok"] > 0 and result["errors"] == {}
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert document["machine"]["cores"] >= 1
