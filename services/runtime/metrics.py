"""Prometheus metrics: one registry per process, created by serve(), never at import time.

Services receive the Metrics object and declare their own instruments on it; names are
prefixed with the service name (e.g. features_cache_hits_total) unless they follow an
existing convention (scoring's nv_inference_*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    start_http_server,
)

# Fit for millisecond-scale RPCs: 0.25 ms .. 10 s.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        # process_* (CPU, memory, open fds) and python_gc_* like the default registry has.
        ProcessCollector(registry=self.registry)
        if GC_COLLECTOR is not None:
            GCCollector(registry=self.registry)

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, list(labels), registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, documentation, list(labels), registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_SECONDS,
    ) -> Histogram:
        return Histogram(name, documentation, list(labels), buckets=list(buckets), registry=self.registry)

    def rpc(self) -> RpcMetrics:
        """The RED instruments of this process's gRPC server (created on first use)."""
        existing = getattr(self, "_rpc", None)
        if existing is None:
            existing = self._rpc = RpcMetrics(self)
        return existing

    def serve_http(self, host: str, port: int) -> None:
        """Expose /metrics on host:port (a thread of prometheus_client's).

        Plain text by default; a scraper asking for OpenMetrics (Accept:
        application/openmetrics-text) also gets the exemplars (trace ids).
        """
        start_http_server(port, addr=host, registry=self.registry)


GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


def grpc_code_name(code: str) -> str:
    """`INVALID_ARGUMENT` -> `InvalidArgument`: go-grpc-prometheus's (Go's) spelling, which
    dashboards and deploy/'s alert rules use; the services' log lines use it too."""
    if code == "OK":
        return "OK"
    if code == "CANCELLED":
        return "Canceled"
    return "".join(part.capitalize() for part in code.split("_"))


class RpcMetrics:
    """RED per RPC, named like go-grpc-prometheus (the convention deploy/ relies on):

    * `grpc_server_started_total{grpc_type,grpc_service,grpc_method}`
    * `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}` (rate, errors)
    * `grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}` (duration; buckets
      LATENCY_BUCKETS_SECONDS), with an exemplar (trace_id, span_id) per observation of a
      sampled request.

    In flight = started - handled. Every process has its own registry, so the service is
    the scrape target (its `service` label in deploy/), not a metric prefix.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.started = metrics.counter(
            "grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS
        )
        self.handled = metrics.counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by gRPC status code name (OK, InvalidArgument, Unavailable, ...).",
            (*GRPC_LABELS, "grpc_code"),
        )
        self.handling = metrics.histogram(
            "grpc_server_handling_seconds",
            "Server-side RPC latency until the status is decided.",
            GRPC_LABELS,
        )
        self._per_method: dict[str, tuple[Any, Any]] = {}
        self._handled: dict[tuple[str, str], Any] = {}

    @staticmethod
    def split(method: str) -> tuple[str, str]:
        """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
        service, _, name = method.strip("/").partition("/")
        return service, name

    def _children(self, method: str) -> tuple[Any, Any]:
        children = self._per_method.get(method)
        if children is None:
            labels = ("unary", *self.split(method))
            children = self._per_method[method] = (self.started.labels(*labels), self.handling.labels(*labels))
        return children

    def start(self, method: str) -> None:
        self._children(method)[0].inc()

    def observe(
        self, method: str, code: str, seconds: float, exemplar: dict[str, str] | None = None
    ) -> None:
        """`code`: the status name as grpc spells it (`INVALID_ARGUMENT`)."""
        key = (method, code)
        handled = self._handled.get(key)
        if handled is None:
            handled = self._handled[key] = self.handled.labels("unary", *self.split(method), grpc_code_name(code))
        handled.inc()
        self._children(method)[1].observe(seconds, exemplar)
