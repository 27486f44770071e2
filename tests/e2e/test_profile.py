"""`infermesh profile` against a running mesh: every replica sampled under load, one flame
graph each, and the summary table with CPU per request for every process."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from infermesh.up.supervisor import Mesh


def test_profile_writes_a_flame_graph_per_replica_and_the_summary(mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "infermesh",
            "profile",
            "--data-dir",
            str(mesh.data_dir),
            "--seconds",
            "3",
            "--concurrency",
            "4",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    replicas = [c.name for c in mesh.children if c.role != "envoy"]
    assert sorted(replicas) == ["features-0", "gateway-0", "jobs-0", "ranking-0", "scoring-0", "scoring-1"]
    summary = json.loads((out / "summary.json").read_text())
    by_name = {p["name"]: p for p in summary["processes"]}
    assert set(by_name) == {*replicas, "envoy"}
    assert summary["load"]["ok"] > 0 and not summary["load"]["errors"]
    # The jobs service idles under Recommend load: it is listed, but need not have samples.
    for name in (r for r in replicas if not r.startswith("jobs")):
        profile = by_name[name]
        assert profile["samples"] > 0 and profile["top_frames"], name
        assert profile["cpu_ms_per_request"] > 0, name
        ET.parse(out / profile["flamegraph"])  # a well-formed SVG
    # Envoy is measured (CPU from /proc) but not sampled: py-spy reads Python stacks only.
    assert by_name["envoy"]["flamegraph"] is None and by_name["envoy"]["cpu_ms_per_request"] > 0
    # The gateway's samples show its own request path.
    gateway_frames = (out / "gateway-0.txt").read_text()
    assert "gateway/pipeline.py" in gateway_frames
    table = (out / "summary.md").read_text()
    assert all(f"| {name} |" in table for name in by_name) and "| **all** |" in table
    assert "| **all** |" in done.stdout  # the table is printed too
