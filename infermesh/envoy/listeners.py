"""Listeners and their HTTP connection managers.

* edge: REST (HTTP/1.1, transcoded to gRPC) and gRPC (HTTP/2) on one port;
  `/inference.GRPCInferenceService/*` goes to scoring, the Open Inference Protocol over
  HTTP (`/v2`, `/v2/*`) to scoring's HTTP port, everything else to the gateway.
  Envoy's own error replies to REST clients are JSON google.rpc.Status bodies (on /v2, the
  protocol's {"error": ...}), and gRPC clients get the status code those bodies carry.
* one internal HTTP/2 listener per backend (features, scoring, ranking) that the gateway
  dials; each forwards to the cluster of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from infermesh.certs import CertPaths
from infermesh.envoy.common import EXTENSIONS_TYPE, Json, socket_address
from infermesh.envoy.edge_auth import strip_identity_headers
from infermesh.envoy.edge_policy import (
    EdgePolicy,
    admission_filter_names,
    admission_filters,
    policy_filter_names,
    policy_filters,
)
from infermesh.envoy.http_filters import buffer, router, transcoder
from infermesh.envoy.routes import (
    HEALTH_ROUTE_PREFIX,
    MAX_OPENAPI_BYTES,
    OIP_HTTP_PATH,
    SCORING_ROUTE_PREFIX,
    exempt,
    grpc_only,
    not_found_route,
    oip_http_routes,
    openapi_route,
    route,
    service_routes,
)
from infermesh.envoy.tls import downstream_tls
from infermesh.envoy.tracing import TRACE_ID_HEADER, Tracing, traced_routes, tracer
from services.runtime.topology import GATEWAY, HEALTH_SERVICE_NAMES, JOBS, SCORING, MeshTopology

_HCM_TYPE = f"{EXTENSIONS_TYPE}.filters.network.http_connection_manager.v3.HttpConnectionManager"

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

# Envoy's own replies to REST clients (not a service's): HTTP status -> the gRPC code whose
# google.rpc.Status JSON body they get, like every error a service returns through the
# transcoder. 404 (an unmapped path) is already JSON (routes.not_found_route).
LOCAL_REPLY_CODES: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,  # the body is not JSON, or a field has the wrong type
    401: grpc.StatusCode.UNAUTHENTICATED,  # no valid API key or token
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # body over the edge's limit
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the edge's rate limit, or shed (admission control)
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,  # could not connect to a gateway replica
    503: grpc.StatusCode.UNAVAILABLE,  # no healthy gateway replica
    504: grpc.StatusCode.DEADLINE_EXCEEDED,  # the gateway did not answer within the deadline
}
# Those of Envoy's own replies whose gRPC status Envoy would otherwise derive from the HTTP
# status as UNAVAILABLE (429: clients would retry into the limit) or UNKNOWN (413), or
# INTERNAL (400): a gRPC client gets the code a REST client's body says.
GRPC_LOCAL_REPLY_CODES: Mapping[int, grpc.StatusCode] = {
    status: LOCAL_REPLY_CODES[status] for status in (400, 413, 429)
}


def listener(name: str, host: str, port: int, hcm: Json, transport_socket: Json | None = None) -> Json:
    chain: Json = {"filters": [hcm]}
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": socket_address(host, port),
        "filter_chains": [chain],
    }


def http_connection_manager(
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
        routes = traced_routes(stat_prefix, routes)
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
        hcm["tracing"] = tracer(tracing)
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def edge_listener(
    topology: MeshTopology,
    tracing: Tracing | None = None,
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> Json:
    edge = edge or EdgePolicy()
    filters = [*policy_filters(edge), buffer(), *admission_filters(edge), transcoder(topology.descriptor_set), router()]
    # AUTO: HTTP/1.1 (REST) and prior-knowledge HTTP/2 (gRPC) share the port.
    hcm = http_connection_manager("edge", "AUTO", _edge_routes(topology, edge), filters, tracing, edge=True)
    hcm["typed_config"]["route_config"]["max_direct_response_body_size_bytes"] = MAX_OPENAPI_BYTES
    hcm["typed_config"]["local_reply_config"] = _json_local_replies(
        oip_http=bool(topology.http_replicas.get(SCORING)), forbidden_as_unauthenticated=edge.jwt is not None
    )
    # Identity headers come from the edge's authentication only, never from the caller.
    hcm["typed_config"]["early_header_mutation_extensions"] = [strip_identity_headers()]
    socket = downstream_tls(tls) if tls is not None else None
    return listener("edge", topology.listen_host, topology.edge_port, hcm, socket)


def internal_listener(topology: MeshTopology, service: str, tracing: Tracing | None = None) -> Json:
    hcm = http_connection_manager(service, "HTTP2", service_routes(service, internal=True), [router()], tracing)
    return listener(service, topology.listen_host, topology.internal_ports[service], hcm)


def _edge_routes(topology: MeshTopology, edge: EdgePolicy) -> list[Json]:
    bypass = policy_filter_names(edge)
    # Load shedding measures and limits the gateway's Recommend calls only: probes, the
    # document and scoring's own clients neither count nor are shed. (REST calls meet it
    # before the transcoder, on the route of their REST path, i.e. the 404's: that one
    # keeps it.)
    unshed = admission_filter_names(edge)
    # Health checks first, outside the rate limit and the authentication: `infermesh up`
    # and load balancers probe the gateway through the edge, and a probe rejected for
    # want of a key or a token would take the whole edge out of rotation.
    health = exempt(route({"prefix": HEALTH_ROUTE_PREFIX}, GATEWAY, internal=False), [*bypass, *unshed])
    # The API description is public, like the health route.
    routes = [health, exempt(openapi_route(topology), [*bypass, *unshed])]
    scoring = service_routes(SCORING, SCORING_ROUTE_PREFIX, internal=False, unbuffered_streams=True)
    routes += [exempt(scoring_route, unshed) for scoring_route in scoring]
    # The Open Inference Protocol over HTTP (/v2/...), to scoring's HTTP port: same policy
    # as its gRPC routes (API keys and rate limit apply, load shedding does not).
    if topology.http_replicas.get(SCORING):
        routes += [exempt(oip_route, unshed) for oip_route in oip_http_routes()]
    # JobService (REST /v1/jobs transcoded, or gRPC); SubmitJob and CancelJob on routes of
    # their own, never retried once sent. Not shed: it is not the pipeline's load.
    if JOBS in topology.replicas:
        jobs = service_routes(JOBS, f"/{HEALTH_SERVICE_NAMES[JOBS]}/", internal=False)
        routes += [exempt(grpc_only(jobs_route), unshed) for jobs_route in jobs]
    # Only gRPC goes upstream (REST has become gRPC in the transcoder by the time routes are
    # matched); a request for a REST path no google.api.http rule maps gets a JSON 404
    # here instead of reaching the gateway as malformed gRPC (5xx, or a 200 with grpc-status 13).
    routes += [grpc_only(gateway_route) for gateway_route in service_routes(GATEWAY, internal=False)]
    routes.append(not_found_route())
    return routes


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


def _access_log(traced: bool = False) -> list[Json]:
    fields = TRACED_ACCESS_LOG_FORMAT if traced else ACCESS_LOG_FORMAT
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": f"{EXTENSIONS_TYPE}.access_loggers.file.v3.FileAccessLog",
                "path": "/dev/stdout",
                "log_format": {"json_format": dict(fields)},
            },
        }
    ]


def _json_local_replies(oip_http: bool = False, forbidden_as_unauthenticated: bool = False) -> Json:
    """Envoy's own error replies as JSON google.rpc.Status for REST requests; gRPC requests
    keep Envoy's conversion to grpc-status / grpc-message. With `oip_http`, those to the
    Open Inference Protocol's HTTP paths (/v2...) are the protocol's {"error": "..."}.
    `forbidden_as_unauthenticated`: Envoy's own 403s become 401 / UNAUTHENTICATED (the JWT
    filter answers 403 to a token for another audience or without a subject: a credential
    the edge refuses, like any other)."""
    mappers = []
    if forbidden_as_unauthenticated:
        unauthenticated = LOCAL_REPLY_CODES[401]
        rewrites = [_oip_http_local_replies(403)] if oip_http else []
        rewrites += [_rest_local_reply(403, unauthenticated), _grpc_local_reply(403, unauthenticated)]
        mappers += [{**mapper, "status_code": 401} for mapper in rewrites]
    if oip_http:
        mappers.append(_oip_http_local_replies())
    mappers += [_rest_local_reply(status, code) for status, code in LOCAL_REPLY_CODES.items()]
    # The rest are gRPC requests (the first matching mapper wins): a grpc-status of our own
    # wins over the one Envoy derives from the HTTP status.
    mappers += [_grpc_local_reply(status, code) for status, code in GRPC_LOCAL_REPLY_CODES.items()]
    return {"mappers": mappers}


# REST: content-type is not gRPC's, or the transcoder has already rewritten the request to
# gRPC (it keeps the REST path in x-envoy-original-path) and then refused its body.
_NOT_GRPC = {
    "or_filter": {
        "filters": [
            {
                "header_filter": {
                    "header": {
                        "name": "content-type",
                        "string_match": {"prefix": "application/grpc"},
                        "invert_match": True,
                    }
                }
            },
            {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}},
        ]
    }
}


def _rest_local_reply(status: int, code: grpc.StatusCode) -> Json:
    return {
        "filter": {"and_filter": {"filters": [_is_status(status), _NOT_GRPC]}},
        "body_format_override": {
            "json_format": {"code": code.value[0], "message": "%LOCAL_REPLY_BODY%", "details": []},
            "content_type": "application/json",
        },
    }


def _grpc_local_reply(status: int, code: grpc.StatusCode) -> Json:
    return {
        "filter": _is_status(status),
        "headers_to_add": [
            {
                "header": {"key": "grpc-status", "value": str(code.value[0])},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def _oip_http_local_replies(status: int | None = None) -> Json:
    """Any reply of Envoy's own on /v2 or under /v2/ (413 body too large, 429, 401, 503 no
    healthy replica, 504...; only `status` if given): the status kept, the body the
    protocol's error object."""
    oip_path = {"safe_regex": {"regex": f"^{OIP_HTTP_PATH}([/?].*)?$"}}
    path_filter: Json = {"header_filter": {"header": {"name": ":path", "string_match": oip_path}}}
    if status is not None:
        path_filter = {"and_filter": {"filters": [_is_status(status), path_filter]}}
    return {
        "filter": path_filter,
        "body_format_override": {
            "json_format": {"error": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }


def _is_status(status: int) -> Json:
    value = {"default_value": status, "runtime_key": f"edge_local_reply.{status}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}
