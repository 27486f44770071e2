"""Prometheus metrics: one registry per process, created by serve(), never at import time.

Services receive the Metrics object and declare their own instruments on it; names are
prefixed with the service name (e.g. features_cache_hits_total) unless they follow an
existing convention (scoring's nv_inference_*, as Triton names them).

Counters come out as prometheus_client writes them (`x_total` plus `x_created`), except
those declared with `bare_counter`: Triton's counters are named without `_total` and
have no `_created` series, and dashboards and alerts written for Triton match only that.
`exposition()` renders both kinds in either format a scraper asks for; `serve_http` serves it.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Fit for millisecond-scale RPCs: 0.25 ms .. 10 s.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
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

    def bare_counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter exposed as `name` exactly: no `_total` suffix, no `_created` series
        (Triton's convention). Used like any Counter; BareCounters renames at scrape time."""
        bare = getattr(self, "_bare", None)
        if bare is None:
            bare = self._bare = BareCounters()
            self.registry.register(bare)
        return bare.counter(name, documentation, labels)

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
        """Expose /metrics on host:port, from a daemon thread (it ends with the process).

        Plain text by default; a scraper asking for OpenMetrics (Accept:
        application/openmetrics-text) also gets the exemplars (trace ids).
        """
        serve_exposition(self.registry, host, port)


class BareCounterFamily(Metric):
    """A counter family whose samples carry the family's own name (no `_total`)."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, "counter")


class BareCounters:
    """Collector of counters exposed without `_total` and `_created`.

    The counters are ordinary prometheus_client Counters (thread-safe, label children
    bound once) on a registry of their own; collect() renames their `_total` samples to
    the family name and drops the `_created` ones.
    """

    def __init__(self) -> None:
        self._registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, list(labels), registry=self._registry)

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            bare = BareCounterFamily(family.name, family.documentation)
            total = family.name + "_total"
            for sample in family.samples:
                if sample.name == total:
                    bare.add_sample(family.name, sample.labels, sample.value, sample.timestamp, sample.exemplar)
            yield bare


class _Families:
    """Families already collected, as a Collector the encoders accept."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(registry: Collector, accept: str = "") -> tuple[bytes, str]:
    """(body, content type) of a scrape of `registry` by a client that sent `accept`.

    OpenMetrics is left to prometheus_client: it writes each family under its own name, so
    a BareCounterFamily comes out as Triton's does. Its text format, though, names every
    counter family `<name>_total` in HELP and TYPE: a bare family is rendered there as the
    library renders a gauge (names as given) with its TYPE line saying counter.
    """
    encoder, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        return encoder(registry), content_type
    parts = []
    for family in registry.collect():
        if isinstance(family, BareCounterFamily):
            as_gauge = Metric(family.name, family.documentation, "gauge")
            as_gauge.samples = family.samples
            text = encoder(_Families([as_gauge])).decode()
            parts.append(text.replace(f"# TYPE {family.name} gauge\n", f"# TYPE {family.name} counter\n", 1).encode())
        else:
            parts.append(encoder(_Families([family])))
    return b"".join(parts), content_type


class _ExpositionHandler(BaseHTTPRequestHandler):
    registry: ClassVar[Collector]

    def do_GET(self) -> None:  # any path, like prometheus_client's server
        body, content_type = exposition(self.registry, self.headers.get("Accept", ""))
        if gzip_accepted(self.headers.get("Accept-Encoding", "")):
            body = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
        else:
            self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line."""


def serve_exposition(registry: Collector, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server of exposition(registry) on host:port (IPv4 or IPv6), in a daemon thread."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("ExpositionServer", (ThreadingHTTPServer,), {"address_family": family})
    handler = type("Handler", (_ExpositionHandler,), {"registry": registry})
    server = server_class((host, port), handler)
    threading.Thread(target=server.serve_forever, name=f"metrics:{port}", daemon=True).start()
    return server


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
        self.started = metrics.counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS)
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

    def observe(self, method: str, code: str, seconds: float, exemplar: dict[str, str] | None = None) -> None:
        """`code`: the status name as grpc spells it (`INVALID_ARGUMENT`)."""
        key = (method, code)
        handled = self._handled.get(key)
        if handled is None:
            handled = self._handled[key] = self.handled.labels("unary", *self.split(method), grpc_code_name(code))
        handled.inc()
        self._children(method)[1].observe(seconds, exemplar)
