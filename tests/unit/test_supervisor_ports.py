"""`infermesh up`'s port check: a port something listens on is taken; one that only holds
connections lingering in TIME_WAIT after a mesh stopped is free (servers bind with
SO_REUSEADDR); a port one process handed out is not handed out by another (claims).
Loopback sockets only."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infermesh.up.port_claims import PortClaims
from infermesh.up.supervisor import MeshError, _PortPicker, free_port, port_is_free

REPO_ROOT = Path(__file__).resolve().parents[2]


def _listener(port: int) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    return server


def test_a_listening_port_is_taken_one_in_time_wait_is_free() -> None:
    port = free_port()
    server = _listener(port)
    assert not port_is_free(port)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection enters TIME_WAIT
    client.recv(1)  # sees the close
    client.close()
    server.close()
    with open("/proc/net/tcp") as table:  # state 06 = TIME_WAIT, local port in hex
        lingering = [line for line in table if f":{port:04X} " in line.split()[1] + " " and line.split()[3] == "06"]
    assert lingering, "expected the server's end of the connection in TIME_WAIT"
    assert port_is_free(port)  # a server with SO_REUSEADDR, as Envoy is, can listen here
    _listener(port).close()


def test_a_port_block_is_not_handed_out_again_until_released_or_expired(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The bookkeeping is under test, not the machine: every port counts as free and claims go
    # to a file of this test's own, so a mesh running beside the tests (its ports in this
    # range) changes nothing.
    monkeypatch.setattr("infermesh.up.supervisor.port_is_free", lambda port: True)
    claims = PortClaims(tmp_path / "claims.json")
    picker = _PortPicker()
    picker._claims = claims
    # A small range: room for a few 1600-port blocks only, as in a long test session.
    monkeypatch.setattr("infermesh.up.supervisor._ephemeral_range", lambda: (30000, 60999))
    blocks = []
    with contextlib.suppress(MeshError):
        while len(blocks) < 20:
            blocks.append(picker.block(1600))
    assert 2 <= len(blocks) < 20  # the range ran out: reserved blocks are not handed out twice
    spans = [range(base, base + 1600) for base in sorted(blocks)]
    assert all(a.stop <= b.start for a, b in zip(spans, spans[1:], strict=False)), "blocks overlap"
    picker.release_block(blocks[0])
    assert picker.block(1600) >= 20000  # a released block can be handed out again
    with contextlib.suppress(MeshError):
        while True:
            picker.block(1600)
    expired = _PortPicker()
    expired._claims = claims
    monkeypatch.setattr(expired, "_blocks", {range(b, b + 1600): 0.0 for b in blocks})
    assert expired.block(1600) >= 20000  # reservations that ended no longer count


def test_a_reserved_port_is_never_handed_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    picker = _PortPicker()
    # Two free ports side by side, claimed in a file of this test's own: the machine's
    # claims (other tests' ports, for five minutes) are not what is tested here.
    picker._claims = PortClaims(tmp_path / "claims.json")
    first = _free_run(2)
    monkeypatch.setattr("infermesh.up.supervisor._SINGLE_PORTS", (first, first + 1))
    picker.reserve([first])  # e.g. the edge port of the command line, not bound yet
    assert picker() == first + 1
    with pytest.raises(MeshError):
        picker()  # both taken now: the reserved one is not handed out


PICK = """
import json, sys, time
from infermesh.up import supervisor
first, count, start_at = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
supervisor._SINGLE_PORTS = (first, first + 2 * count - 1)
picker = supervisor._PortPicker()
while time.time() < start_at:  # both processes pick at the same moment
    time.sleep(0.001)
print(json.dumps([picker() for _ in range(count)]))
"""


def _free_run(length: int) -> int:
    for first in range(12000, 19000, 97):
        if all(port_is_free(p) for p in range(first, first + length)):
            return first
    raise AssertionError("no run of free ports")


def test_two_processes_never_hand_out_the_same_port(tmp_path: Path) -> None:
    # Each picks 20 of the same 40 free ports at random: without claims they would all but
    # surely share some (the chance of no overlap is 1 in C(40, 20)).
    count = 20
    first = _free_run(2 * count)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    argv = [sys.executable, "-c", PICK, str(first), str(count), str(time.time() + 1.5)]
    pickers = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT) for _ in range(2)]
    picked = [json.loads(p.communicate(timeout=60)[0]) for p in pickers]
    assert all(p.returncode == 0 for p in pickers)
    assert sorted(picked[0] + picked[1]) == list(range(first, first + 2 * count))


def test_a_claim_lasts_until_released_expired_or_its_process_is_gone(tmp_path: Path) -> None:
    claims = PortClaims(tmp_path / "claims.json")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Another live process's claim holds; this process's own claims never block it.
        (tmp_path / "claims.json").write_text(json.dumps([[100, 200, other.pid, time.time() + 60]]))
        assert not claims.claim(range(150, 151), 60)
        assert claims.claim(range(200, 300), 60) and claims.claim(range(250, 251), 60)
        claims.release(range(200, 300))
        assert [c[:2] for c in json.loads((tmp_path / "claims.json").read_text())] == [[100, 200], [250, 251]]
    finally:
        other.kill()
        other.wait()
    assert claims.claim(range(150, 151), 60)  # its process is gone
    (tmp_path / "claims.json").write_text(json.dumps([[100, 200, 1, time.time() - 1]]))  # pid 1: alive, expired
    assert claims.claim(range(150, 151), 60)
    (tmp_path / "claims.json").write_text("[[100, 2")  # cut short by a killed writer
    assert claims.claim(range(150, 151), 60)
