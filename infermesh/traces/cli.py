"""`infermesh traces`: OTLP receivers (gRPC, and HTTP/protobuf) and the local trace view,
until Ctrl-C.

    infermesh traces [--otlp-port 4317] [--otlp-http-port 4318] [--http-port 16686] [--host 127.0.0.1]

Then run the mesh with `infermesh up --otlp-endpoint http://127.0.0.1:4317` (or start both
at once with `infermesh up --trace-view`), or over OTLP/HTTP with
`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf infermesh up --otlp-endpoint http://127.0.0.1:4318`
(with `--otlp-http-port 4318` here),
and open http://127.0.0.1:16686.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from infermesh.traces.receiver import OtlpHttpReceiver, OtlpReceiver
from infermesh.traces.store import TraceStore
from infermesh.traces.traceview import TraceView

DEFAULT_OTLP_PORT = 4317
DEFAULT_OTLP_HTTP_PORT = 4318
DEFAULT_HTTP_PORT = 16686


@dataclass
class LocalTracing:
    """Receivers + store + web UI in this process (threads)."""

    store: TraceStore
    receiver: OtlpReceiver
    view: TraceView
    http_receiver: OtlpHttpReceiver | None = None

    @classmethod
    def start(
        cls,
        *,
        host: str = "127.0.0.1",
        otlp_port: int = DEFAULT_OTLP_PORT,
        http_port: int = DEFAULT_HTTP_PORT,
        max_traces: int = 2000,
        receiver_now: bool = True,
        otlp_http_port: int | None = None,
    ) -> LocalTracing:
        """Start the web UI, the OTLP/HTTP receiver if `otlp_http_port` is given, and the
        gRPC receiver unless `receiver_now` is False (then call start_receiver(): `infermesh
        up` does so after forking its children, since a process that forks while gRPC
        threads run gets gRPC's fork warnings)."""
        store = TraceStore(max_traces=max_traces)
        view = TraceView(store, host, http_port).start()
        local = cls(store, OtlpReceiver(store, host, otlp_port), view)
        try:
            if otlp_http_port is not None:
                local.http_receiver = OtlpHttpReceiver(store, host, otlp_http_port).start()
            if receiver_now:
                local.start_receiver()
        except OSError:
            local.stop()
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
        if self.http_receiver is not None:
            self.http_receiver.stop()


def build_parser(prog: str = "infermesh traces") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Receive OTLP traces (gRPC and HTTP/protobuf) and show them in a local web UI."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--otlp-port", type=int, default=DEFAULT_OTLP_PORT, help="OTLP/gRPC port (default %(default)s)")
    parser.add_argument(
        "--otlp-http-port",
        type=int,
        default=None,
        help=f"also receive OTLP/HTTP (protobuf, POST /v1/traces) on this port, e.g. {DEFAULT_OTLP_HTTP_PORT} "
        "(default: off)",
    )
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="web UI port (default %(default)s)")
    parser.add_argument("--max-traces", type=int, default=2000, help="traces kept in memory (default %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        local = LocalTracing.start(
            host=args.host,
            otlp_port=args.otlp_port,
            http_port=args.http_port,
            max_traces=args.max_traces,
            otlp_http_port=args.otlp_http_port,
        )
    except OSError as error:
        print(f"infermesh traces: {error} (choose other ports with --otlp-port / --otlp-http-port / --http-port)")
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"trace view     {local.view.url}\n"
        f"OTLP/gRPC      {local.receiver.endpoint}   "
        f"(infermesh up --otlp-endpoint {local.receiver.endpoint})\n"
        + (
            f"OTLP/HTTP      {local.http_receiver.endpoint}   (OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf "
            f"infermesh up --otlp-endpoint {local.http_receiver.endpoint})\n"
            if local.http_receiver is not None
            else ""
        )
        + "Ctrl-C stops it.",
        flush=True,
    )
    stop.wait()
    local.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
