"""TLS (a `CertPaths`, opt-in, certificates from `infermesh certs`): TLS on the edge
listener and mTLS from Envoy to every replica.

The gateway reaches the backends' internal listeners in plaintext: they bind to loopback
locally (see docs/envoy.md).
"""

from __future__ import annotations

from pathlib import Path

from infermesh.certs import CertPaths
from infermesh.envoy.common import EXTENSIONS_TYPE, Json


def _file(path: Path) -> Json:
    return {"filename": str(path)}


def downstream_tls(tls: CertPaths) -> Json:
    """The edge listener's TLS: Envoy presents the edge certificate."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                # h2 and http/1.1: gRPC and REST still share the edge port (codec AUTO).
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [{"certificate_chain": _file(tls.edge_cert), "private_key": _file(tls.edge_key)}],
            },
        },
    }


def upstream_tls(tls: CertPaths, service: str, alpn: tuple[str, ...] = ("h2",)) -> Json:
    """mTLS to `service`'s replicas: Envoy's client certificate; theirs must name `service`.
    `alpn`: h2 for the gRPC servers, http/1.1 for an HTTP/1.1 one (scoring's REST port)."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": service,
            "common_tls_context": {
                "alpn_protocols": list(alpn),
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "tls_certificates": [
                    {"certificate_chain": _file(tls.client_cert), "private_key": _file(tls.client_key)}
                ],
                "validation_context": {
                    "trusted_ca": _file(tls.ca_cert),
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": service}}],
                },
            },
        },
    }
