"""One cluster per service: HTTP/2 upstream, round robin over its replicas, with the
traffic policy of resilience and, given certificates, mTLS to every replica. A service that
also serves HTTP (scoring's Open Inference Protocol over REST) has a second cluster for that
port, `<service>_http`: HTTP/1.1, checked on the protocol's readiness endpoint."""

from __future__ import annotations

from collections.abc import Sequence

from infermesh.certs import CertPaths
from infermesh.envoy.common import CONNECT_TIMEOUT, HTTP_OPTIONS_KEY, Json, http2_upstream, lb_endpoint
from infermesh.envoy.resilience import (
    OUTLIER_DETECTION,
    circuit_breakers,
    health_check,
    health_gating,
    http_health_check,
)
from infermesh.envoy.tls import upstream_tls
from services.runtime.topology import Endpoint, MeshTopology, http_cluster

# The Open Inference Protocol's readiness endpoint: 200 once every model is ready.
HTTP_READY_PATH = "/v2/health/ready"


def service_cluster(topology: MeshTopology, service: str, tls: CertPaths | None = None) -> Json:
    cluster = _cluster(topology, service, topology.replicas[service], health_check(service))
    cluster["typed_extension_protocol_options"] = http2_upstream()
    if tls is not None:
        cluster["transport_socket"] = upstream_tls(tls, service)
    return cluster


def http_service_cluster(topology: MeshTopology, service: str, tls: CertPaths | None = None) -> Json:
    """`service`'s HTTP port: HTTP/1.1 to each replica's, the same traffic policy as its gRPC
    cluster, health from GET /v2/health/ready."""
    check = http_health_check(HTTP_READY_PATH)
    cluster = _cluster(topology, http_cluster(service), topology.http_replicas[service], check)
    cluster["typed_extension_protocol_options"] = {
        HTTP_OPTIONS_KEY: {
            "@type": f"type.googleapis.com/{HTTP_OPTIONS_KEY}",
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    if tls is not None:
        # The replica's certificate names the service, whichever port presents it.
        cluster["transport_socket"] = upstream_tls(tls, service, alpn=("http/1.1",))
    return cluster


def _cluster(topology: MeshTopology, name: str, endpoints: Sequence[Endpoint], check: Json) -> Json:
    if topology.discovery not in ("STATIC", "STRICT_DNS"):
        raise ValueError(f"discovery must be STATIC or STRICT_DNS, not {topology.discovery!r}")
    if not endpoints:
        raise ValueError(f"{name} has no replicas")
    cluster: Json = {
        "name": name,
        "type": topology.discovery,
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [lb_endpoint(e) for e in endpoints]}],
        },
        "health_checks": [check],
        "common_lb_config": health_gating(),
        "outlier_detection": dict(OUTLIER_DETECTION),
        "circuit_breakers": circuit_breakers(),
    }
    if topology.discovery == "STRICT_DNS":
        # Kubernetes Services resolve to IPv4 pod addresses.
        cluster["dns_lookup_family"] = "V4_ONLY"
    return cluster
