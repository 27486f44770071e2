"""`up`'s Redis is ready once PING answers +PONG: not while it loads its saved data
(-LOADING), which seeding would fail on. A canned loopback peer plays redis-server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from infermesh.up.supervisor import _redis_pong


@pytest.fixture
def peer() -> Iterator[tuple[int, list[bytes], list[bytes]]]:
    """(port, replies to send, requests received): one connection per reply."""
    server = socket.create_server(("127.0.0.1", 0))
    replies: list[bytes] = []
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(4096))
                conn.sendall(replies.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], replies, received
    server.close()


def test_loading_is_not_ready_pong_is(peer: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, _ = peer
    replies += [b"-LOADING Redis is loading the dataset in memory\r\n", b"+PONG\r\n"]
    assert not _redis_pong(port, None)
    assert _redis_pong(port, None)


def test_with_a_password_it_authenticates_first(peer: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, received = peer
    replies += [b"+OK\r\n-LOADING Redis is loading the dataset in memory\r\n", b"+OK\r\n+PONG\r\n"]
    assert not _redis_pong(port, "s3cret")
    assert _redis_pong(port, "s3cret")
    assert received[-1] == b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\nPING\r\n"


def test_a_refused_password_is_not_ready(peer: tuple[int, list[bytes], list[bytes]]) -> None:
    port, replies, _ = peer
    replies += [b"-WRONGPASS invalid username-password pair\r\n-NOAUTH Authentication required.\r\n"]
    assert not _redis_pong(port, "wrong")
