"""`infermesh profile`'s own logic: collapsed stacks in, top frames, flame graph and table out."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from infermesh import flamegraph
from infermesh.profile import ProcessProfile, is_wait_frame, read_stacks, summary_markdown, top_frames, waiting_share
from infermesh.up.runfile import MeshProcess, read_processes, remove_processes, write_processes

SVG = "{http://www.w3.org/2000/svg}"
RAW = """\
<module> (gateway/__main__.py:5);run (services/runtime/server.py:40);recommend (gateway/pipeline.py:120) 60
<module> (gateway/__main__.py:5);run (services/runtime/server.py:40);log (services/runtime/logs.py:9) 30
<module> (gateway/__main__.py:5);select (selectors.py:468) 10
not a stack line
"""


def test_reads_collapsed_stacks_and_ranks_leaf_frames(tmp_path: Path) -> None:
    raw = tmp_path / "gateway-0.txt"
    raw.write_text(RAW)
    stacks = read_stacks(raw)
    assert sum(stacks.values()) == 100 and len(stacks) == 3
    top = top_frames(stacks, 2)
    assert top == [("recommend (gateway/pipeline.py:120)", 0.6), ("log (services/runtime/logs.py:9)", 0.3)]
    assert read_stacks(tmp_path / "absent.txt") == Counter()
    assert top_frames(Counter(), 5) == []


def test_wait_points_are_set_apart_from_the_top_frames() -> None:
    # py-spy counts a thread blocked in C as busy on many hosts: the event loop's run, grpc's
    # poller thread (Thread.run over C), an idle executor worker hold that idle time.
    stacks = Counter(
        {
            (
                "<module> (gateway/__main__.py:6)",
                "run (uvloop/__init__.py:92)",
                "Runner.run (asyncio/runners.py:118)",
            ): 50,
            ("Thread._bootstrap (threading.py:1002)", "Thread.run (threading.py:982)"): 20,
            ("Thread.run (/usr/lib/python3.11/threading.py:982)", "_worker (concurrent/futures/thread.py:81)"): 5,
            ("<module> (gateway/__main__.py:6)", "EpollSelector.select (selectors.py:468)"): 5,
            ("<module> (gateway/__main__.py:6)", "run (services/runtime/server.py:712)"): 12,
            ("<module> (gateway/__main__.py:6)", "Recommend (gateway/service.py:192)"): 8,
        }
    )
    assert top_frames(stacks, 5) == [
        ("run (services/runtime/server.py:712)", 0.12),
        ("Recommend (gateway/service.py:192)", 0.08),
    ]
    assert waiting_share(stacks) == 0.8
    assert waiting_share(Counter()) == 0.0
    # A function named like a wait point elsewhere is work.
    assert not is_wait_frame("run (services/runtime/server.py:712)")
    assert is_wait_frame("Thread.run (/usr/lib/python3.11/threading.py:982)")


def test_flame_graph_is_svg_with_one_frame_per_call_path() -> None:
    stacks = Counter({("main", "f", "g"): 3, ("main", "h"): 1, ("main", "f"): 2})
    svg = flamegraph.render(stacks, "gateway-0 <pid 1>")
    root = ET.fromstring(svg)  # well-formed, names escaped
    groups = {
        g.find(f"{SVG}title").text.split(" (")[0]: g.find(f"{SVG}rect")
        for g in root.iter(f"{SVG}g")
        if g.find(f"{SVG}title") is not None
    }
    titles = [t.text for t in root.iter(f"{SVG}title")]
    # A callee sits one row above its caller and is no wider than it.
    assert float(groups["g"].get("y")) > float(groups["f"].get("y")) > float(groups["main"].get("y"))
    assert float(groups["g"].get("width")) < float(groups["f"].get("width")) < float(groups["main"].get("width"))
    assert {t.split(" (")[0] for t in titles} == {"main", "f", "g", "h"}
    assert "main (6 samples, 100.0%)" in titles and "h (1 samples, 16.7%)" in titles


def test_summary_sums_cpu_per_request_over_processes() -> None:
    profiles = [
        ProcessProfile("gateway-0", "gateway", 10, 1.0, 0.5, 1.25, 100, [("recommend (p.py:1)", 0.6)], "gateway-0.svg"),
        ProcessProfile("envoy", "envoy", 11, 0.4, 0.2, 0.5, 0, [], None),
    ]
    table = summary_markdown(profiles, None, 2.0)
    assert "| gateway-0 | 10 | 1.250 | 0.50 | 100 | 60% recommend (p.py:1) |" in table
    profiles[0].waiting_share = 0.3
    assert "60% recommend (p.py:1)<br>(30% at wait points: idle, or C code below them) |" in summary_markdown(
        profiles, None, 2.0
    )
    assert "| **all** | | **1.750** | 0.70 | | |" in table


def test_run_file_round_trip_drops_dead_processes(tmp_path: Path) -> None:
    dead = 2**22 + 12345  # above pid_max's default: never a live process
    write_processes(
        tmp_path,
        "127.0.0.1:8080",
        [
            MeshProcess("gateway-0", "gateway", os.getpid(), True),
            MeshProcess("scoring-0", "scoring", dead, True),
        ],
    )
    run = read_processes(tmp_path)
    assert run.edge == "127.0.0.1:8080" and [p.name for p in run.processes] == ["gateway-0"]
    assert json.loads((tmp_path / "processes.json").read_text())["processes"][1]["pid"] == dead
    remove_processes(tmp_path)
    with pytest.raises(SystemExit, match="no mesh is running"):
        read_processes(tmp_path)


@pytest.mark.parametrize(
    "text",
    ["{}", "[]", '{"edge": "127.0.0.1:8080", "processes": [{"name": "gateway-0"}]}', '{"edge": 1, "processes": 3}'],
)
def test_a_run_file_that_is_json_but_not_ours_is_one_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "processes.json").write_text(text)
    with pytest.raises(SystemExit, match="is not a run file of `infermesh up`"):
        read_processes(tmp_path)
