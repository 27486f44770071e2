"""The Python client against the real mesh: typed results, errors, and failover between edges."""

from __future__ import annotations

import socket

import grpc
import pytest

from infermesh.client import AsyncMeshClient, ClientError, MeshClient
from infermesh.up.supervisor import Mesh, free_port

CANDIDATES = [f"i{n}" for n in range(200)]


def test_sync_client_returns_typed_results(mesh: Mesh) -> None:
    with MeshClient([f"127.0.0.1:{mesh.topology.edge_port}"]) as client:
        result = client.recommend("u42", CANDIDATES, k=20)
    assert len(result.items) == 20 and result.model_version == "1"
    assert [i.score for i in result.items] == sorted((i.score for i in result.items), reverse=True)
    assert set(result.stage_ms) == {"features", "scoring", "ranking"}


async def test_async_client_and_errors(mesh: Mesh) -> None:
    async with AsyncMeshClient([f"127.0.0.1:{mesh.topology.edge_port}"]) as client:
        result = await client.recommend("u7", CANDIDATES[:50], k=5)
        assert len(result.items) == 5
        with pytest.raises(ClientError) as raised:
            await client.recommend("u7", CANDIDATES, k=0)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "k must be" in raised.value.message


def test_fails_over_from_a_dead_edge(mesh: Mesh) -> None:
    # A port nobody listens on, listed first: every call must still succeed via the live edge.
    dead = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", dead)) != 0
    with MeshClient([f"127.0.0.1:{dead}", f"127.0.0.1:{mesh.topology.edge_port}"], timeout=5) as client:
        results = [client.recommend("u1", CANDIDATES[:20], k=3) for _ in range(10)]
    assert all(len(r.items) == 3 for r in results)
