"""Render the mesh's static Envoy v3 bootstrap (no control plane) from a MeshTopology, and
run Envoy on it.

Envoy reads JSON bootstrap files, so the config is built as plain dicts and written as
JSON. One module per concern:

* listeners: the edge (REST transcoded to gRPC, gRPC, and the Open Inference Protocol
  over HTTP, on one port) and one internal HTTP/2 listener per backend that the gateway dials;
* routes: each service's routes, the Open Inference Protocol's /v2, the OpenAPI document,
  the JSON 404;
* http_filters: buffer (the request-size limit), gRPC-JSON transcoder, router;
* clusters: one per service, health-checked, HTTP/2 upstream (plus scoring_http, HTTP/1.1);
* resilience: timeouts, retries, retry budget, circuit breakers, outlier detection,
  health checks;
* edge_policy: opt-in rate limit and API-key authentication at the edge (`EdgePolicy`);
* tls: opt-in TLS at the edge and mTLS to the replicas (`CertPaths`);
* tracing: opt-in OpenTelemetry tracer and its collector cluster (`Tracing`);
* admin: admin API, overload manager, runtime layers;
* common: what they share (JSON type, addresses, HTTP/2 upstream options);
* bootstrap: `render` puts them together; `write`, and the committed envoy/local.json;
* process: the Envoy binary, its command line, `--mode validate`;
* cli: `python -m infermesh.envoy render|check` (`infermesh envoy ...`).

This package exposes what the rest of the code uses; the constants each concern is tuned
with live in (and are imported from) its module.
"""

from infermesh.envoy.bootstrap import (
    DEFAULT_DESCRIPTOR_SET,
    GENPROTO_PACKAGE,
    INSTALLED_DESCRIPTOR_SET,
    LOCAL_CONFIG,
    LOCAL_TRACING,
    local_config_is_fresh,
    local_config_topology,
    plain_proxy,
    render,
    to_json,
    write,
)
from infermesh.envoy.common import REPO_ROOT, Json
from infermesh.envoy.edge_policy import ApiKey, EdgePolicy, load_api_keys, parse_api_keys
from infermesh.envoy.http_filters import MAX_REQUEST_BYTES, TRANSCODER_PRINT_OPTIONS
from infermesh.envoy.process import EnvoyError, envoy_binary, envoy_command, validate
from infermesh.envoy.routes import OPENAPI_PATH
from infermesh.envoy.tracing import COLLECTOR_CLUSTER, Tracing, sampling_percent_from_env, tracing_from_env

__all__ = [
    "COLLECTOR_CLUSTER",
    "DEFAULT_DESCRIPTOR_SET",
    "GENPROTO_PACKAGE",
    "INSTALLED_DESCRIPTOR_SET",
    "LOCAL_CONFIG",
    "LOCAL_TRACING",
    "MAX_REQUEST_BYTES",
    "OPENAPI_PATH",
    "REPO_ROOT",
    "TRANSCODER_PRINT_OPTIONS",
    "ApiKey",
    "EdgePolicy",
    "EnvoyError",
    "Json",
    "Tracing",
    "envoy_binary",
    "envoy_command",
    "load_api_keys",
    "local_config_is_fresh",
    "local_config_topology",
    "parse_api_keys",
    "plain_proxy",
    "render",
    "sampling_percent_from_env",
    "to_json",
    "tracing_from_env",
    "validate",
    "write",
]
