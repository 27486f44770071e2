"""`infermesh traces`: an OTLP receiver and the local trace view, until Ctrl-C.

    infermesh traces [--otlp-port 4317] [--http-port 16686] [--host 127.0.0.1]

Then run the mesh with `infermesh up --otlp-endpoint http://127.0.0.1:4317` (or start both
at once with `infermesh up --trace-view`) and open http://127.0.0.1:16686.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore
from infermesh.traces.traceview import TraceView

DEFAULT_OTLP_PORT = 4317
DEFAULT_HTTP_PORT = 16686


@dataclass
class LocalTracing:
    """Receiver + store + web UI in this process (threads)."""

    store: TraceStore
    receiver: OtlpReceiver
    view: TraceView

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        otlp_port: int = DEFAULT_OTLP_PORT,
        http_port: int = DEFAULT_HTTP_PORT,
        max_traces: int = 2000,
        receiver_now: bool = True,
    ) -> LocalTracing:
        """Start the web UI, and the receiver unless `receiver_now` is False (then call
        start_receiver(): `infermesh up` does so after forking its children, since a
        process that forks while gRPC threads run gets gRPC's fork warnings)."""
        store = TraceStore(max_traces=max_traces)
        view = TraceView(store, host, http_port).start()
        receiver = OtlpReceiver(store, host, otlp_port)
        local = cls(store, receiver, view)
        if receiver_now:
            try:
                local.start_receiver()
            except OSError:
                view.stop()
                raise
        return local

    def start_receiver(self) -> None:
        self.receiver.start()

    @property
    def otlp_endpoint(self) -> str:
        return f"http://{self.receiver.host}:{self.receiver.port or self.receiver.requested_port}"

    def stop(self) -> None:
        self.view.stop()
        self.receiver.stop()


def build_parser(prog: str = "infermesh traces") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Receive OTLP/gRPC traces and show them in a local web UI."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--otlp-port", type=int, default=DEFAULT_OTLP_PORT, help="OTLP/gRPC port (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="web UI port (default %(default)s)")
    parser.add_argument("--max-traces", type=int, default=2000, help="traces kept in memory (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        local = LocalTracing.start(
            host=args.host, otlp_port=args.otlp_port, http_port=args.http_port, max_traces=args.max_traces
        )
    except OSError as error:
        print(f"infermesh traces: {error} (choose other ports with --otlp-port / --http-port)")
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"trace view     {local.view.url}\n"
        f"OTLP/gRPC      {local.receiver.endpoint}   "
        f"(infermesh up --otlp-endpoint {local.receiver.endpoint})\n"
        "Ctrl-C stops it.",
        flush=True,
    )
    stop.wait()
    local.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
