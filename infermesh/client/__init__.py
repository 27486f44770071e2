"""Python client for infermesh: `MeshClient` (blocking) and `AsyncMeshClient` (asyncio).

from infermesh.client import MeshClient
with MeshClient(["127.0.0.1:8080"]) as client:
    result = client.recommend("u42", [f"i{n}" for n in range(200)], k=20)
    print(result.model_version, result.items[0])
"""

from infermesh.client.client import (
    AsyncMeshClient,
    ClientError,
    Job,
    MeshClient,
    Recommendation,
    RecommendedItem,
)

__all__ = ["AsyncMeshClient", "ClientError", "Job", "MeshClient", "Recommendation", "RecommendedItem"]
