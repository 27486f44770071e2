"""Building blocks every part of the Envoy bootstrap shares: JSON type, addresses, HTTP/2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.runtime.topology import Endpoint

Json = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Prefix of every Envoy extension's `@type`.
EXTENSIONS_TYPE = "type.googleapis.com/envoy.extensions"
CONNECT_TIMEOUT = "1s"

HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def socket_address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def lb_endpoint(endpoint: Endpoint) -> Json:
    return {"endpoint": {"address": socket_address(endpoint.host, endpoint.port)}}


def http2_upstream() -> Json:
    """Upstream protocol options of a gRPC cluster: HTTP/2 to every endpoint."""
    return {
        HTTP_OPTIONS_KEY: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS_KEY}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
