"""Small OTLP trace receivers: over gRPC (opentelemetry-proto's TraceService, our own
server) and over HTTP/protobuf (POST of an ExportTraceServiceRequest to /v1/traces).

Every service's OTLP span exporter (either protocol) and Envoy's OpenTelemetry tracer can
export to them; they keep what arrives in a TraceStore. They are what `infermesh traces` /
`infermesh up --trace-view` run on a laptop without a collector, and what the tracing
tests assert on. Not a collector: no processing, no forwarding, memory only.
"""

from __future__ import annotations

import zlib
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from infermesh.traces.http_server import BackgroundHttpServer
from infermesh.traces.store import TraceStore

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# OTLP/HTTP: the path under a collector's base URL, and the one content type taken here
# (OTLP/JSON is not decoded: the services never send it).
OTLP_HTTP_TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


class TraceServiceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: TraceStore) -> None:
        self._store = store

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._store.add_request(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`OtlpReceiver(store).start()` listens on host:port (0: a free port; see .port)."""

    def __init__(self, store: TraceStore, host: str = "127.0.0.1", port: int = 0, workers: int = 4) -> None:
        self.store = store
        self.host = host
        self.requested_port = port
        self._workers = workers
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT should say to reach this receiver."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="otlp"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceServiceServicer(self.store), server)
        try:
            self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        except RuntimeError as error:
            raise OSError(f"cannot listen for OTLP on {self.host}:{self.requested_port}: {error}") from None
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _OtlpHttpHandler(BaseHTTPRequestHandler):
    """POST <path>: an ExportTraceServiceRequest (protobuf, optionally gzip or deflate, sent
    with a Content-Length or chunked); 200 with an empty ExportTraceServiceResponse, or the
    status OTLP/HTTP gives the error."""

    receiver: OtlpHttpReceiver
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter reuses its connection

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] != self.receiver.path:
            self._reply(HTTPStatus.NOT_FOUND, f"OTLP traces are received at {self.receiver.path}")
            return
        try:
            body = self._body()
        except ValueError as error:
            self._reply(HTTPStatus.BAD_REQUEST, str(error))
            self.close_connection = True  # what is left of the body is not read
            return
        if body is None:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_MESSAGE_BYTES} bytes")
            self.close_connection = True
            return
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type != PROTOBUF:
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send {PROTOBUF} (OTLP/JSON is not accepted)")
            return
        try:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(self._decompress(body))
        except (DecodeError, zlib.error, ValueError):
            self._reply(HTTPStatus.BAD_REQUEST, "the body is not an ExportTraceServiceRequest")
            return
        self.receiver.store.add_request(request)
        self.receiver.requests_received += 1
        self._reply(HTTPStatus.OK, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def _body(self) -> bytes | None:
        """The request body, by Content-Length or chunked (Envoy's OTLP/HTTP exporter sends
        chunks); None past MAX_MESSAGE_BYTES. ValueError for a malformed framing."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._chunked_body()
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit():
            raise ValueError("a bad Content-Length")
        if int(length) > MAX_MESSAGE_BYTES:
            return None
        return self.rfile.read(int(length))

    def _chunked_body(self) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = self.rfile.readline(64).split(b";", 1)[0].strip()  # chunk extensions ignored
            try:
                chunk = int(line, 16)
            except ValueError:
                raise ValueError("a bad chunk size") from None
            if chunk == 0:
                while self.rfile.readline(1024).strip():  # trailers, up to the empty line
                    pass
                return b"".join(chunks)
            size += chunk
            if size > MAX_MESSAGE_BYTES:
                return None
            chunks.append(self.rfile.read(chunk))
            self.rfile.readline(8)  # the CRLF after each chunk

    def _decompress(self, body: bytes) -> bytes:
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding == "identity":
            return body
        if encoding not in _WBITS:
            raise ValueError("unknown content encoding")
        # Inflated in one bounded step: a small body must not expand past the limit.
        inflater = zlib.decompressobj(_WBITS[encoding])
        data = inflater.decompress(body, MAX_MESSAGE_BYTES + 1)
        if len(data) > MAX_MESSAGE_BYTES or inflater.unconsumed_tail:
            raise ValueError("too large")
        return data

    def _reply(self, status: HTTPStatus, body: bytes | str) -> None:
        payload = body if isinstance(body, bytes) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", PROTOBUF if isinstance(body, bytes) else "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # one line per export would drown the console


class OtlpHttpReceiver(BackgroundHttpServer):
    """`OtlpHttpReceiver(store).start()`: OTLP/HTTP (protobuf) on host:port (0: a free
    port; see .port), accepting POSTs at `path` (default /v1/traces), in a daemon thread."""

    what = "OTLP/HTTP"

    def __init__(
        self, store: TraceStore, host: str = "127.0.0.1", port: int = 0, path: str = OTLP_HTTP_TRACES_PATH
    ) -> None:
        super().__init__(host, port)
        self.store = store
        self.path = path
        self.requests_received = 0

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT should say (with OTEL_EXPORTER_OTLP_PROTOCOL=
        http/protobuf) to reach this receiver at the default path."""
        return f"http://{self.host}:{self.port or self.requested_port}"

    @property
    def traces_url(self) -> str:
        """What OTEL_EXPORTER_OTLP_TRACES_ENDPOINT should say: the full URL."""
        return self.endpoint + self.path

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_OtlpHttpHandler,), {"receiver": self})
