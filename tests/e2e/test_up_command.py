"""`infermesh up` as a user runs it: it comes up, serves, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infermesh.up.supervisor import free_port, free_port_block
from tests.conftest import RedisServer


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_then_sigterm_leaves_no_process(
    redis_server: RedisServer, reference_data: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(reference_data / "models", data_dir / "models")  # skip retraining
    edge = free_port()
    process = subprocess.Popen(
        [
            sys.executable, "-m", "infermesh.cli", "up",
            "--data-dir", str(data_dir),
            "--redis-url", redis_server.url,
            "--edge-port", str(edge),
            "--admin-port", str(free_port()),
            "--port-base", str(free_port_block(1500)),  # replicas from N+100, metrics 1000 above
            "--replicas", "scoring=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(output)
        assert "infermesh is up" in text, text
        assert f"http://127.0.0.1:{edge}" in text

        body = json.dumps({"user_id": "u42", "candidate_ids": [f"i{n}" for n in range(200)], "k": 20}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{edge}/v1/recommend", data=body, timeout=10) as response:
            assert len(json.loads(response.read())["items"]) == 20

        started = descendants(process.pid)
        # 5 service processes (gateway, features, scoring x2, ranking) + Envoy
        assert len(started) >= 6, started
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
        output.append(rest)
        assert process.returncode == 0, "".join(output)
        assert "stopped." in rest
        leftovers = [pid for pid in started if alive(pid)]
        assert not leftovers, f"processes left behind: {leftovers}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
