"""One cluster per service: HTTP/2 upstream, round robin over its replicas, with the
traffic policy of resilience and, given certificates, mTLS to every replica."""

from __future__ import annotations

from infermesh.certs import CertPaths
from infermesh.envoy.common import CONNECT_TIMEOUT, Json, http2_upstream, lb_endpoint
from infermesh.envoy.resilience import OUTLIER_DETECTION, circuit_breakers, health_check, health_gating
from infermesh.envoy.tls import upstream_tls
from services.runtime.topology import MeshTopology


def service_cluster(topology: MeshTopology, service: str, tls: CertPaths | None = None) -> Json:
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
            "endpoints": [{"lb_endpoints": [lb_endpoint(e) for e in endpoints]}],
        },
        "typed_extension_protocol_options": http2_upstream(),
        "health_checks": [health_check(service)],
        "common_lb_config": health_gating(),
        "outlier_detection": dict(OUTLIER_DETECTION),
        "circuit_breakers": circuit_breakers(),
    }
    if tls is not None:
        cluster["transport_socket"] = upstream_tls(tls, service)
    if topology.discovery == "STRICT_DNS":
        # Kubernetes Services resolve to IPv4 pod addresses.
        cluster["dns_lookup_family"] = "V4_ONLY"
    return cluster
