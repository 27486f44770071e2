"""Routes: each service's RPCs (state-changing ones and streams on routes of their own),
the public API description, and the JSON 404 for REST paths nothing maps."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from infermesh.envoy.common import Json
from infermesh.envoy.http_filters import BUFFER_FILTER
from infermesh.envoy.resilience import (
    HTTP_IDEMPOTENT_RETRY_ON,
    HTTP_RETRIABLE_STATUS_CODES,
    IDEMPOTENT_RETRY_ON,
    NON_IDEMPOTENT_METHODS,
    NON_IDEMPOTENT_TIMEOUT,
    UNSENT_RETRY_ON,
    RouteLimits,
    retry_policy,
    route_limits,
)
from services.runtime.topology import HEALTH_SERVICE_NAMES, SCORING, MeshTopology, http_cluster

SCORING_ROUTE_PREFIX = f"/{HEALTH_SERVICE_NAMES[SCORING]}/"
HEALTH_ROUTE_PREFIX = "/grpc.health.v1.Health/"
# Long-lived bidirectional streams, per cluster: routed on their own with no route or
# per-try timeout (a stream lasts as long as its client keeps it open; the caller's
# grpc-timeout still applies, uncapped, and so does the listener's idle timeout) and no
# retry that could replay requests already answered.
STREAMING_METHODS: Mapping[str, tuple[str, ...]] = {
    SCORING: (f"/{HEALTH_SERVICE_NAMES[SCORING]}/ModelStreamInfer",),
}

# The Open Inference Protocol over HTTP/REST (KServe v2 / Triton): server metadata at /v2,
# everything else under /v2/ (health, model metadata and readiness, inference).
OIP_HTTP_PATH = "/v2"
OIP_HTTP_PREFIX = "/v2/"

# The REST API's OpenAPI document, which scripts/gen_protos.py writes next to the descriptor set.
OPENAPI_PATH = "/v1/openapi.json"
OPENAPI_FILE = "openapi.json"
# Envoy caps direct-response bodies at 4 KiB unless the route config says otherwise.
MAX_OPENAPI_BYTES = 1024 * 1024

JSON_CONTENT_TYPE = {
    "header": {"key": "content-type", "value": "application/json"},
    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
}


def route(match: Json, cluster: str, *, internal: bool, idempotent: bool = True) -> Json:
    """A route to `cluster` on an internal listener (the gateway's calls) or the edge."""
    if not idempotent:
        # A call that changes state must not run twice: only retry what never left Envoy.
        limits = RouteLimits(NON_IDEMPOTENT_TIMEOUT, NON_IDEMPOTENT_TIMEOUT, per_try_timeout=None)
        return _route(match, cluster, limits, UNSENT_RETRY_ON)
    return _route(match, cluster, route_limits(cluster, internal=internal), IDEMPOTENT_RETRY_ON)


def _route(match: Json, cluster: str, limits: RouteLimits, retry_on: str) -> Json:
    action: Json = {
        "cluster": cluster,
        # The caller's grpc-timeout, capped, else the default: every call has a deadline.
        # (With max_stream_duration set, Envoy ignores a route's `timeout`.)
        "max_stream_duration": {
            "max_stream_duration": limits.default_deadline,
            "grpc_timeout_header_max": limits.max_deadline,
        },
        "retry_policy": retry_policy(retry_on, limits.per_try_timeout),
    }
    if limits.hedged:
        action["hedge_policy"] = {"hedge_on_per_try_timeout": True}
    return {
        "match": match,
        "route": action,
        # The service plans for the deadline Envoy enforces (the gateway splits it into stage
        # budgets); a caller's own grpc-timeout is left as it is.
        "request_headers_to_add": [
            {
                "header": {"key": "grpc-timeout", "value": grpc_timeout(limits.default_deadline)},
                "append_action": "ADD_IF_ABSENT",
            }
        ],
    }


def grpc_timeout(duration: str) -> str:
    """An Envoy duration ("2s", "0.5s") as a grpc-timeout header value in milliseconds ("2000m")."""
    return f"{round(float(duration.removesuffix('s')) * 1000)}m"


def _streaming_route(path: str, cluster: str) -> Json:
    return {
        "match": {"path": path},
        "route": {
            "cluster": cluster,
            "timeout": "0s",  # none: the stream's own lifetime
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},  # the caller's deadline, uncapped
            "retry_policy": retry_policy(UNSENT_RETRY_ON),
        },
    }


def service_routes(cluster: str, prefix: str = "/", *, internal: bool, unbuffered_streams: bool = False) -> list[Json]:
    """Routes to `cluster` for paths under `prefix`: its state-changing RPCs and streams
    first. On a listener that buffers requests (the edge), `unbuffered_streams` switches
    the buffer off for streams, which would otherwise wait for the client's last message."""
    routes = [
        route({"path": path}, cluster, internal=internal, idempotent=False)
        for path in NON_IDEMPOTENT_METHODS.get(cluster, ())
    ]
    for path in STREAMING_METHODS.get(cluster, ()):
        stream = _streaming_route(path, cluster)
        routes.append(exempt(stream, [BUFFER_FILTER]) if unbuffered_streams else stream)
    return [*routes, route({"prefix": prefix}, cluster, internal=internal)]


def http_route(match: Json, cluster: str, limits: RouteLimits) -> Json:
    """A route to an HTTP/1.1 (not gRPC) upstream. Its timeout is the deadline, which Envoy
    tells the service in x-envoy-expected-rq-timeout-ms (the per-try timeout, the shorter);
    retried on another replica like the idempotent gRPC calls, a 503 (UNAVAILABLE) too."""
    policy = retry_policy(HTTP_IDEMPOTENT_RETRY_ON, limits.per_try_timeout)
    policy["retriable_status_codes"] = list(HTTP_RETRIABLE_STATUS_CODES)
    return {"match": match, "route": {"cluster": cluster, "timeout": limits.default_deadline, "retry_policy": policy}}


def oip_http_routes() -> list[Json]:
    """The edge's routes for the Open Inference Protocol over HTTP: /v2 and /v2/... to
    scoring's HTTP port. Every call of it only reads (metadata, health, inference)."""
    cluster = http_cluster(SCORING)
    limits = route_limits(cluster, internal=False)
    return [
        http_route({"path": OIP_HTTP_PATH}, cluster, limits),
        http_route({"prefix": OIP_HTTP_PREFIX}, cluster, limits),
    ]


def exempt(route: Json, filters: Sequence[str]) -> Json:
    """`route` with the given HTTP filters switched off (the edge's health check and OpenAPI routes)."""
    if not filters:
        return route
    disabled = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    per_filter = {**route.get("typed_per_filter_config", {}), **{name: disabled for name in filters}}
    return {**route, "typed_per_filter_config": per_filter}


def grpc_only(route: Json) -> Json:
    grpc = {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
    return {**route, "match": {**route["match"], "headers": [grpc]}}


def openapi_route(topology: MeshTopology) -> Json:
    """GET /v1/openapi.json answered by Envoy itself, from the file it read at start-up."""
    return {
        "match": {"path": OPENAPI_PATH},
        "direct_response": {
            "status": 200,
            "body": {"filename": str(topology.descriptor_set.parent / OPENAPI_FILE)},
        },
        "response_headers_to_add": [JSON_CONTENT_TYPE],
    }


def not_found_route() -> Json:
    # google.rpc.Status shape, like the transcoder's own error bodies (code 5 = NOT_FOUND).
    body = json.dumps(
        {"code": 5, "message": f"no such endpoint; the REST API is described at {OPENAPI_PATH}", "details": []}
    )
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": body}},
        "response_headers_to_add": [JSON_CONTENT_TYPE],
    }
