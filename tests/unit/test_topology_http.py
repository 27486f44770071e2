"""Scoring's HTTP port (the Open Inference Protocol over REST) in the topology table and in what
`infermesh up` gives each replica: one per scoring replica, the gRPC port + 300 locally,
free ports for meshes started beside another."""

from __future__ import annotations

from pathlib import Path

from infermesh.up.supervisor import Mesh, free_topology
from services.runtime.topology import (
    GATEWAY,
    HTTP_PORT_OFFSET,
    HTTP_SERVICES,
    SCORING,
    SERVICES,
    Endpoint,
    http_cluster,
    local_topology,
)

DESCRIPTOR = Path("services/genproto/infermesh_descriptor.binpb")


def test_scoring_replicas_serve_http_at_their_grpc_port_plus_the_offset() -> None:
    topology = local_topology({SCORING: 3}, descriptor_set=DESCRIPTOR)
    assert HTTP_SERVICES == (SCORING,) and http_cluster(SCORING) == "scoring_http"
    assert set(topology.http_replicas) == {SCORING}
    assert [e.port for e in topology.http_replicas[SCORING]] == [30600, 30601, 30602]
    for replica, http in zip(topology.replicas[SCORING], topology.http_replicas[SCORING], strict=True):
        assert (
            topology.http_endpoint(SCORING, replica) == http == Endpoint(replica.host, replica.port + HTTP_PORT_OFFSET)
        )
    assert topology.http_endpoint(GATEWAY, topology.replicas[GATEWAY][0]) is None
    assert topology.http_endpoint(SCORING, Endpoint("127.0.0.1", 1)) is None  # not one of its replicas


def test_moved_replica_ports_move_the_http_ports_too() -> None:
    topology = local_topology(descriptor_set=DESCRIPTOR, replica_base_ports={SCORING: 20300})
    assert [e.port for e in topology.http_replicas[SCORING]] == [20600, 20601]


def test_the_http_ports_are_taken_nowhere_else() -> None:
    for topology in (local_topology(descriptor_set=DESCRIPTOR), free_topology({SCORING: 2})):
        grpc_ports = {e.port for name in SERVICES for e in topology.replicas[name]}
        http_ports = [e.port for e in topology.http_replicas[SCORING]]
        assert len(set(http_ports)) == 2 and not grpc_ports & set(http_ports)
        assert not {topology.edge_port, topology.admin_port, *topology.internal_ports.values()} & set(http_ports)


def test_up_gives_each_scoring_replica_its_http_port(tmp_path: Path) -> None:
    topology = local_topology({SCORING: 2}, descriptor_set=DESCRIPTOR)
    mesh = Mesh(topology, tmp_path, "redis://127.0.0.1:1/0", tmp_path / "models", tmp_path / "logs")
    for replica, http in zip(topology.replicas[SCORING], topology.http_replicas[SCORING], strict=True):
        assert mesh.service_env(SCORING, replica)["SCORING_HTTP_PORT"] == str(http.port)
    assert "GATEWAY_HTTP_PORT" not in mesh.service_env(GATEWAY, topology.replicas[GATEWAY][0])
    # `up` refuses to start when one of them is taken, like every other port of the mesh.
    assert ("scoring HTTP", 30601) in mesh._ports()
