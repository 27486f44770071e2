"""An HTTP server in a daemon thread, for the trace view and the OTLP/HTTP receiver."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class BackgroundHttpServer:
    """`start()` listens on host:port (0: a free port, then see `.port`) and serves in a
    daemon thread; `stop()` closes it. Subclasses say what they serve (`handler`) and how
    to name it in errors and thread names (`what`)."""

    what = "HTTP"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> Self:
        try:
            server = ThreadingHTTPServer((self.host, self.requested_port), self.handler())
        except OSError as error:
            raise OSError(f"cannot listen for {self.what} on {self.host}:{self.requested_port}: {error}") from None
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=self.what, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
