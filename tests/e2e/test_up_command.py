"""`infermesh up` as a user runs it: it comes up, serves, and SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.request
from pathlib import Path

from infermesh.up.supervisor import free_port
from tests.conftest import RedisServer
from tests.processes import alive, descendants, start_up, wait_until_up


def test_up_serves_then_sigterm_leaves_no_process(
    redis_server: RedisServer, reference_data: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(reference_data / "models", data_dir / "models")  # skip retraining
    edge = free_port()
    process = start_up(data_dir, redis_server.url, edge, "--replicas", "scoring=2")
    output: list[str] = []
    try:
        wait_until_up(process, output, timeout=120)
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
