"""TLS (a `CertPaths`, opt-in, certificates from `infermesh certs`): TLS on the edge
listener and mTLS from Envoy to every replica. And the pieces every TLS context of the
renderer shares (sds, edge_auth): the transport socket, the minimum version, SAN matchers.

The gateway reaches the backends' internal listeners in plaintext: they bind to loopback
locally (see docs/envoy.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from infermesh.certs import CertPaths
from infermesh.envoy.common import EXTENSIONS_TYPE, Json

_TLS_TYPES = f"{EXTENSIONS_TYPE}.transport_sockets.tls.v3"


def tls_socket(context_type: str, context: Json) -> Json:
    """Envoy's TLS transport socket with `context` (its fields after @type), a
    `context_type` of transport_sockets.tls.v3 (UpstreamTlsContext, DownstreamTlsContext)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": f"{_TLS_TYPES}.{context_type}", **context},
    }


def tls_params() -> Json:
    return {"tls_minimum_protocol_version": "TLSv1_2"}


def san_matchers(names: Iterable[str]) -> list[Json]:
    """The peer's certificate must name one of `names` (DNS SANs)."""
    return [{"san_type": "DNS", "matcher": {"exact": name}} for name in names]


def _file(path: Path) -> Json:
    return {"filename": str(path)}


def downstream_tls(tls: CertPaths) -> Json:
    """The edge listener's TLS: Envoy presents the edge certificate."""
    return edge_tls_socket(tls.edge_cert, tls.edge_key)


def edge_tls_socket(cert: Path, key: Path) -> Json:
    """The edge listener's TLS with the certificate `cert` and its key `key` (PEM files)."""
    common = {
        # h2 and http/1.1: gRPC and REST still share the edge port (codec AUTO).
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_params": tls_params(),
        "tls_certificates": [{"certificate_chain": _file(cert), "private_key": _file(key)}],
    }
    return tls_socket("DownstreamTlsContext", {"common_tls_context": common})


def upstream_tls(tls: CertPaths, service: str, alpn: tuple[str, ...] = ("h2",)) -> Json:
    """mTLS to `service`'s replicas: Envoy's client certificate; theirs must name `service`.
    `alpn`: h2 for the gRPC servers, http/1.1 for an HTTP/1.1 one (scoring's REST port)."""
    common = {
        "alpn_protocols": list(alpn),
        "tls_params": tls_params(),
        "tls_certificates": [{"certificate_chain": _file(tls.client_cert), "private_key": _file(tls.client_key)}],
        "validation_context": {
            "trusted_ca": _file(tls.ca_cert),
            "match_typed_subject_alt_names": san_matchers([service]),
        },
    }
    return tls_socket("UpstreamTlsContext", {"sni": service, "common_tls_context": common})
