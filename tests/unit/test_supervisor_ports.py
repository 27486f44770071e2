"""`infermesh up`'s port check: a port something listens on is taken; one that only holds
connections lingering in TIME_WAIT after a mesh stopped is free (servers bind with
SO_REUSEADDR). Loopback sockets only."""

from __future__ import annotations

import socket

from infermesh.up.supervisor import free_port, port_is_free


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
