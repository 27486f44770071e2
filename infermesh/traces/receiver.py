"""A small OTLP/gRPC trace receiver: opentelemetry-proto's TraceService, our own server.

Every service's OTLPSpanExporter and Envoy's OpenTelemetry tracer can export to it; it
keeps what arrives in a TraceStore. It is what `infermesh traces` / `infermesh up
--trace-view` run on a laptop without a collector, and what the tracing tests assert on.
Not a collector: no processing, no forwarding, memory only.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from infermesh.traces.store import TraceStore

MAX_MESSAGE_BYTES = 32 * 1024 * 1024


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
