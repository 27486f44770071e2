"""`infermesh up`'s port check: a port something listens on is taken; one that only holds
connections lingering in TIME_WAIT after a mesh stopped is free (servers bind with
SO_REUSEADDR). Loopback sockets only."""

from __future__ import annotations

import contextlib
import socket

import pytest

from infermesh.up.supervisor import MeshError, _PortPicker, free_port, port_is_free


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


def test_a_port_block_is_not_handed_out_again_until_released_or_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    picker = _PortPicker()
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
    monkeypatch.setattr(expired, "_blocks", {range(b, b + 1600): 0.0 for b in blocks})
    assert expired.block(1600) >= 20000  # reservations that ended no longer count


def test_a_reserved_port_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    picker = _PortPicker()
    first = free_port()
    monkeypatch.setattr("infermesh.up.supervisor._SINGLE_PORTS", (first, first + 1))
    picker.reserve([first])  # e.g. the edge port of the command line, not bound yet
    assert picker() == first + 1
    with pytest.raises(MeshError):
        picker()  # both taken now: the reserved one is not handed out
