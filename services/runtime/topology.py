"""The shape of a running mesh: which services exist, their replicas, and Envoy's ports.

One table of names used everywhere (process names, Envoy clusters, health service names,
OTEL_SERVICE_NAME), so the local mesh and Kubernetes cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GATEWAY, FEATURES, SCORING, RANKING = "gateway", "features", "scoring", "ranking"
# JobService (services/jobs): submits and tracks bulk jobs, which its Celery workers run
# through the edge; the workers are processes of the jobs service too, not replicas here.
JOBS = "jobs"
SERVICES: tuple[str, ...] = (GATEWAY, FEATURES, SCORING, RANKING, JOBS)
# Services the gateway calls through Envoy (each gets an internal Envoy listener).
BACKENDS: tuple[str, ...] = (FEATURES, SCORING, RANKING)

# grpc.health.v1 service names: the fully qualified gRPC service each one serves.
HEALTH_SERVICE_NAMES: Mapping[str, str] = {
    GATEWAY: "infermesh.gateway.v1.GatewayService",
    FEATURES: "infermesh.features.v1.FeatureService",
    SCORING: "inference.GRPCInferenceService",
    RANKING: "infermesh.ranking.v1.RankingService",
    JOBS: "infermesh.jobs.v1.JobService",
}

DEFAULT_EDGE_PORT = 8080
DEFAULT_ADMIN_PORT = 9901
# Envoy listener the gateway dials for each backend service.
DEFAULT_INTERNAL_PORTS: Mapping[str, int] = {FEATURES: 9101, SCORING: 9102, RANKING: 9103}
# First port of each service's replicas on one machine: replica i listens on base + i, its
# metrics 1000 above (`--metrics-port-offset`). Below Linux's ephemeral range (32768-60999),
# where no outgoing connection can be holding one of them when `infermesh up` starts.
DEFAULT_REPLICA_BASE_PORTS: Mapping[str, int] = {
    GATEWAY: 30100,
    FEATURES: 30200,
    SCORING: 30300,
    RANKING: 30400,
    JOBS: 30500,
}
DEFAULT_REPLICAS: Mapping[str, int] = {GATEWAY: 1, FEATURES: 1, SCORING: 2, RANKING: 1, JOBS: 1}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MeshTopology:
    """Everything the Envoy renderer and the process supervisor need to agree on."""

    replicas: Mapping[str, tuple[Endpoint, ...]]
    descriptor_set: Path
    edge_port: int = DEFAULT_EDGE_PORT
    admin_port: int = DEFAULT_ADMIN_PORT
    internal_ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_INTERNAL_PORTS))
    # Where Envoy's listeners bind; 127.0.0.1 locally, 0.0.0.0 in a container.
    listen_host: str = "127.0.0.1"
    # STATIC for fixed local addresses; STRICT_DNS for Kubernetes headless Services.
    discovery: str = "STATIC"

    def internal_endpoint(self, service: str) -> Endpoint:
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "127.0.0.1") else self.listen_host
        return Endpoint(host, self.internal_ports[service])


def local_topology(
    replicas: Mapping[str, int] | None = None,
    *,
    descriptor_set: Path,
    edge_port: int = DEFAULT_EDGE_PORT,
    admin_port: int = DEFAULT_ADMIN_PORT,
    internal_ports: Mapping[str, int] | None = None,
    replica_base_ports: Mapping[str, int] | None = None,
) -> MeshTopology:
    """Topology of a one-machine mesh: every replica on 127.0.0.1 at consecutive ports."""
    counts = {**DEFAULT_REPLICAS, **(replicas or {})}
    bases = {**DEFAULT_REPLICA_BASE_PORTS, **(replica_base_ports or {})}
    for name, count in counts.items():
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; services are {', '.join(SERVICES)}")
        if count < 1:
            raise ValueError(f"{name} needs at least 1 replica, got {count}")
    return MeshTopology(
        replicas={
            name: tuple(Endpoint("127.0.0.1", bases[name] + i) for i in range(counts[name]))
            for name in SERVICES
        },
        descriptor_set=descriptor_set,
        edge_port=edge_port,
        admin_port=admin_port,
        internal_ports=dict(internal_ports or DEFAULT_INTERNAL_PORTS),
    )
