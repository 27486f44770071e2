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
# Envoy's worker threads where it shares one machine with every service (`infermesh up`,
# the benchmarks' hops): one proxies far more than the Python services serve, with fewer
# cross-thread wake-ups than Envoy's default of one per core (docs/benchmarks.md, eleventh
# pass). Kubernetes gives Envoy a pod of its own (deploy/base/envoy.yaml).
ONE_MACHINE_ENVOY_WORKERS = 1
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
# Services that also serve HTTP/REST beside gRPC, from the same process: scoring speaks the
# Open Inference Protocol over HTTP too (GET /v2/health/ready, POST /v2/models/<name>/infer,
# as Triton and KServe serve it), on a second port of each replica.
HTTP_SERVICES: tuple[str, ...] = (SCORING,)
# Locally, replica i's HTTP port is its gRPC port + this (scoring: 30600 + i), in the block
# between the replicas' ports and their metrics ports (1000 above), so `--port-base` moves it too.
HTTP_PORT_OFFSET = 300


def http_cluster(service: str) -> str:
    """The Envoy cluster of `service`'s HTTP port: the service's name with `_http`, so the
    one name still says which service it is (its gRPC cluster has the bare name)."""
    return f"{service}_http"


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
    # The HTTP endpoints of the HTTP_SERVICES, one per replica in the order of `replicas`
    # (replica i serves gRPC on replicas[s][i] and HTTP on http_replicas[s][i]). A service
    # missing here serves no HTTP: the edge then has no route to it.
    http_replicas: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)

    def internal_endpoint(self, service: str) -> Endpoint:
        host = "127.0.0.1" if self.listen_host in ("0.0.0.0", "127.0.0.1") else self.listen_host
        return Endpoint(host, self.internal_ports[service])

    def http_endpoint(self, service: str, replica: Endpoint) -> Endpoint | None:
        """Where the replica of `service` at gRPC endpoint `replica` serves HTTP, if it does."""
        endpoints = self.http_replicas.get(service)
        if not endpoints or replica not in self.replicas.get(service, ()):
            return None
        return endpoints[self.replicas[service].index(replica)]


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
    endpoints = {name: tuple(Endpoint("127.0.0.1", bases[name] + i) for i in range(counts[name])) for name in SERVICES}
    return MeshTopology(
        replicas=endpoints,
        descriptor_set=descriptor_set,
        edge_port=edge_port,
        admin_port=admin_port,
        internal_ports=dict(internal_ports or DEFAULT_INTERNAL_PORTS),
        http_replicas={
            name: tuple(Endpoint(e.host, e.port + HTTP_PORT_OFFSET) for e in endpoints[name]) for name in HTTP_SERVICES
        },
    )
