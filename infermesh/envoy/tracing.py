"""Tracing (when a `Tracing` is given): Envoy's OpenTelemetry tracer on every listener.

W3C traceparent in and out, a server span per request plus a span per upstream call
(spawn_upstream_span), sampled at `sampling_percent` for requests that arrive without a
sampling decision; spans go over OTLP/gRPC, or OTLP/HTTP (protobuf), to an
`opentelemetry_collector` cluster. The edge returns the trace id as an `x-trace-id`
header. Health checks are never traced.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from infermesh.envoy.common import (
    CONNECT_TIMEOUT,
    EXTENSIONS_TYPE,
    Json,
    http2_upstream,
    lb_endpoint,
)
from infermesh.envoy.routes import HEALTH_ROUTE_PREFIX
from services.runtime.settings import TelemetrySettings, load_settings
from services.runtime.topology import Endpoint

COLLECTOR_CLUSTER = "opentelemetry_collector"
TRACE_ID_HEADER = "x-trace-id"
OTLP_EXPORT_TIMEOUT = "1s"
_NEVER = {"numerator": 0, "denominator": "HUNDRED"}
_UNTRACED = {"client_sampling": _NEVER, "random_sampling": _NEVER, "overall_sampling": _NEVER}


@dataclass(frozen=True)
class Tracing:
    """Envoy's OpenTelemetry tracer, exporting to an OTLP collector.

    otlp_endpoint: for `protocol` grpc, `http://host:4317`, `https://host:4317` or
    `host:4317`; for http/protobuf, the full URL spans are POSTed to, e.g.
    `http://host:4318/v1/traces` (Envoy refuses a tracer without an exporter, so no
    endpoint means no tracer: the gateway then starts each trace). sampling_percent: share
    of new traces Envoy samples; a request that already carries a traceparent keeps its
    sampled flag.
    """

    otlp_endpoint: str
    sampling_percent: float = 100.0
    service_name: str = "envoy"
    flush_interval_ms: int = 1000
    min_flush_spans: int = 512
    protocol: Literal["grpc", "http/protobuf"] = "grpc"

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling_percent <= 100.0:
            raise ValueError(f"sampling_percent must be within 0..100, got {self.sampling_percent}")
        parse_otlp_endpoint(self.otlp_endpoint, self.protocol)


def parse_otlp_endpoint(endpoint: str, protocol: str = "grpc") -> tuple[str, int, bool]:
    """`http://host:4317` -> (host, 4317, tls=False); a bare `host:port` is plaintext (gRPC
    only). OTLP/HTTP: a URL with its path, e.g. `http://host:4318/v1/traces` -> port 4318."""
    text = endpoint.strip()
    http = protocol == "http/protobuf"
    parts = urlsplit(text if "://" in text or http else f"http://{text}")
    if parts.scheme not in (("http", "https") if http else ("http", "https", "grpc")) or not parts.hostname:
        expected = "http://host:port/v1/traces" if http else "http://host:port or host:port"
        raise ValueError(f"OTLP endpoint {endpoint!r}: expected {expected}")
    if not http and parts.path not in ("", "/"):
        raise ValueError(f"OTLP endpoint {endpoint!r}: OTLP/gRPC takes no path")
    try:
        port = parts.port or (4318 if http else 4317)
    except ValueError:
        raise ValueError(f"OTLP endpoint {endpoint!r}: bad port") from None
    return parts.hostname, port, parts.scheme == "https"


def sampling_percent_from_env(environ: Mapping[str, str]) -> float:
    """Envoy's random_sampling for the OTEL_TRACES_SAMPLER(_ARG) the services run with.

    Envoy starts the trace of every outside request and the services' default
    parent-based samplers follow its decision, so this is where the ratio takes effect.
    """
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
        except ValueError:
            ratio = 1.0  # what the SDK falls back to
        return min(100.0, max(0.0, ratio * 100.0))
    return 100.0


def tracing_from_env(environ: Mapping[str, str]) -> Tracing | None:
    """The tracer matching the services' OTEL_* variables (protocol, endpoint, sampler), if
    they export: read as the services read them (services/runtime/settings.py), so a bad
    value raises the same SettingsError naming the variable. None when nothing is exported
    (no endpoint, OTEL_TRACES_EXPORTER=none, OTEL_SDK_DISABLED=true)."""
    settings = load_settings(TelemetrySettings, environ)
    if not settings.exporting:
        return None
    return Tracing(
        otlp_endpoint=settings.traces_endpoint,
        sampling_percent=sampling_percent_from_env(environ),
        protocol=settings.traces_protocol,
    )


def tracer(tracing: Tracing) -> Json:
    """The `tracing` block of a listener's HTTP connection manager."""
    provider: Json = {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "service_name": tracing.service_name,
    }
    if tracing.protocol == "http/protobuf":
        # OTLP/HTTP: Envoy POSTs protobuf to the URL's path through the collector cluster.
        uri = {"uri": tracing.otlp_endpoint, "cluster": COLLECTOR_CLUSTER, "timeout": OTLP_EXPORT_TIMEOUT}
        provider["http_service"] = {"http_uri": uri}
    else:
        provider["grpc_service"] = {
            "envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER},
            "timeout": OTLP_EXPORT_TIMEOUT,
        }
    return {
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": provider},
        "random_sampling": {"value": tracing.sampling_percent},
        # A span for each upstream call besides the request's server span, so the trace
        # shows the time between Envoy and the replica it picked (and each retry).
        "spawn_upstream_span": True,
    }


def traced_routes(listener: str, routes: list[Json]) -> list[Json]:
    """`routes` with span names, plus an untraced route for health checks."""
    # Names the listener's server span ("edge ingress", "features ingress", ...); Envoy's
    # default is a bare "ingress" for every listener.
    decorator = {"operation": f"{listener} ingress", "propagate": False}
    named = [{**route, "decorator": decorator} for route in routes]
    # Health checks (the gateway's readiness probes, every second; `infermesh up`'s) are
    # not requests: routed like "/", but Envoy never starts a trace for them.
    health_match = {"prefix": HEALTH_ROUTE_PREFIX}
    if named and named[0]["match"] == health_match:  # the edge has its own already
        return [{**named[0], "tracing": _UNTRACED}, *named[1:]]
    (catch_all,) = [route for route in named if route["match"] == {"prefix": "/"}]
    health = {**catch_all, "match": health_match, "tracing": _UNTRACED}
    return [health, *named]


def flush_runtime_layer(tracing: Tracing) -> Json:
    """A static runtime layer with the tracer's export batching."""
    # Envoy buffers spans per worker and exports every 5 s or at 5 spans, i.e. one
    # OTLP call per traced request: at 512 the export is one call per ~60 requests
    # under load (measured: the receiver's CPU per request fell ~5x), and the interval
    # of a second keeps a trace whole in the trace view moments after the request.
    static = {
        "tracing.opentelemetry.flush_interval_ms": tracing.flush_interval_ms,
        "tracing.opentelemetry.min_flush_spans": tracing.min_flush_spans,
    }
    return {"name": "tracing", "static_layer": static}


def collector_cluster(endpoint: str, protocol: str = "grpc") -> Json:
    """The collector's cluster: HTTP/2 for OTLP/gRPC, HTTP/1.1 (what every OTLP/HTTP
    receiver speaks) for OTLP/HTTP."""
    host, port, tls = parse_otlp_endpoint(endpoint, protocol)
    http = protocol == "http/protobuf"
    try:
        ipaddress.ip_address(host)
        kind = "STATIC"
    except ValueError:
        kind = "STRICT_DNS"
    cluster: Json = {
        "name": COLLECTOR_CLUSTER,
        "type": kind,
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": COLLECTOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [lb_endpoint(Endpoint(host, port))]}],
        },
    }
    if not http:
        cluster["typed_extension_protocol_options"] = http2_upstream()
    if kind == "STRICT_DNS":
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{EXTENSIONS_TYPE}.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"alpn_protocols": ["http/1.1" if http else "h2"]},
            },
        }
    return cluster
