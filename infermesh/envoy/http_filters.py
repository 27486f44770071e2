"""The edge's HTTP filters that every rendering has: request buffer, gRPC-JSON transcoder,
router. (The opt-in rate limit and API-key filters are in edge_policy.)"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from infermesh.envoy.common import EXTENSIONS_TYPE, Json
from services.runtime.topology import GATEWAY, HEALTH_SERVICE_NAMES, JOBS

GATEWAY_GRPC_SERVICE = HEALTH_SERVICE_NAMES[GATEWAY]
# The services whose google.api.http rules the edge transcodes (REST /v1/recommend, /v1/jobs).
TRANSCODED_SERVICES = (GATEWAY_GRPC_SERVICE, HEALTH_SERVICE_NAMES[JOBS])
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # gRPC's own default max message size
BUFFER_FILTER = "envoy.filters.http.buffer"

# How the transcoder prints response JSON; the OpenAPI generator (infermesh/openapi.py,
# run by scripts/gen_protos.py) describes responses with the same options.
TRANSCODER_PRINT_OPTIONS: Mapping[str, bool] = {
    "always_print_primitive_fields": True,
    "preserve_proto_field_names": True,
}


def router() -> Json:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": f"{EXTENSIONS_TYPE}.filters.http.router.v3.Router"},
    }


def transcoder(descriptor_set: Path) -> Json:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor": str(descriptor_set),
            "services": list(TRANSCODED_SERVICES),
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


def buffer() -> Json:
    # Every edge RPC but the streams (whose routes switch it off) is unary, so buffering
    # the request costs nothing and gives one request-size limit (413) for REST and gRPC alike.
    return {
        "name": BUFFER_FILTER,
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.filters.http.buffer.v3.Buffer",
            "max_request_bytes": MAX_REQUEST_BYTES,
        },
    }
