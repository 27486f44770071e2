"""Cross-request coalescing through the real mesh (GATEWAY_COALESCE, on by default).

Concurrent Recommend calls are sent as batches to each stage (GetFeaturesBatch, one
ModelInfer over their rows, RankBatch); the answers must be the ones each request gets
alone, a bad request must fail alone, and each request keeps its own deadline.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from infermesh.up.supervisor import Mesh
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.processes import metric

pytestmark = pytest.mark.timeout(180)

RNG = np.random.default_rng(2026)


def _mixed_requests(count: int) -> list[gateway_pb2.RecommendRequest]:
    """Different users, k, offsets and candidate lists, some overlapping, some repeated."""
    shared = [f"i{n}" for n in RNG.choice(100_000, 150, replace=False)]
    requests = []
    for n in range(count):
        own = [f"i{i}" for i in RNG.choice(100_000, int(RNG.integers(20, 200)), replace=False)]
        candidates = (shared[: int(RNG.integers(0, 150))] + own) if n % 3 else own
        requests.append(
            gateway_pb2.RecommendRequest(
                user_id=f"u{int(RNG.integers(0, 10_000))}",
                candidate_ids=candidates,
                k=int(RNG.integers(1, 40)),
                offset=int(RNG.integers(0, 3)),
            )
        )
    requests.append(requests[0])  # the very same request twice in one batch
    return requests


def _answer(reply: gateway_pb2.RecommendResponse) -> tuple:
    return (
        [i.item_id for i in reply.items],
        [i.category for i in reply.items],
        reply.model_version,
        reply.unknown_items,
        reply.total_items,
        reply.degraded,
        list(reply.degraded_reasons),
    )


def _batches(mesh: Mesh, stage: str) -> tuple[float, float]:
    """(calls, calls that carried more than one request) the gateway made to a stage."""
    port = mesh.metrics_ports["gateway-0"]
    calls = metric(port, "gateway_stage_batch_requests_count", stage=stage)
    alone = metric(port, "gateway_stage_batch_requests_bucket", stage=stage, le="1.0")
    return calls, calls - alone


async def _concurrently(stub: gateway_pb2_grpc.GatewayServiceStub, requests: list, timeout: float = 10.0) -> list:
    return await asyncio.gather(*(stub.Recommend(r, timeout=timeout) for r in requests), return_exceptions=True)


async def test_coalesced_answers_are_the_ones_each_request_gets_alone(mesh: Mesh) -> None:
    requests = _mixed_requests(40)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        alone = [await stub.Recommend(r, timeout=10) for r in requests]  # one at a time: batches of 1
        before = {stage: _batches(mesh, stage) for stage in ("features", "scoring", "ranking")}
        together = await _concurrently(stub, requests)
        after = {stage: _batches(mesh, stage) for stage in ("features", "scoring", "ranking")}
    for stage in ("features", "scoring", "ranking"):
        assert after[stage][1] > before[stage][1], f"no {stage} call carried more than one request"
    assert not [r for r in together if isinstance(r, BaseException)]
    for one, joined in zip(alone, together, strict=False):
        assert _answer(joined) == _answer(one)
        # The model saw the rows inside a bigger batch: the same scores, to float precision.
        np.testing.assert_allclose([i.score for i in joined.items], [i.score for i in one.items], rtol=1e-5, atol=1e-6)


async def test_a_bad_request_fails_alone_inside_a_batch(mesh: Mesh) -> None:
    requests = _mixed_requests(24)
    unknown = gateway_pb2.RecommendRequest(user_id="u-nobody", candidate_ids=["i1", "i2"], k=2)
    batch = requests[:12] + [unknown] + requests[12:]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        before = _batches(mesh, "features")[1]
        results = await _concurrently(stub, batch)
        assert _batches(mesh, "features")[1] > before
    failed = results[12]
    assert isinstance(failed, grpc.aio.AioRpcError) and failed.code() == grpc.StatusCode.NOT_FOUND
    assert "u-nobody" in failed.details()
    others = results[:12] + results[13:]
    assert all(isinstance(r, gateway_pb2.RecommendResponse) and r.items for r in others)


async def test_each_request_keeps_its_own_deadline_inside_a_batch(mesh: Mesh) -> None:
    requests = _mixed_requests(30)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        patient = [stub.Recommend(r, timeout=10) for r in requests]
        # Sent last, behind 31 others: 2 ms is not enough for all three stages.
        hurried = stub.Recommend(requests[1], timeout=0.002)
        results = await asyncio.gather(*patient, hurried, return_exceptions=True)
    assert all(isinstance(r, gateway_pb2.RecommendResponse) for r in results[:-1])
    late = results[-1]
    assert isinstance(late, grpc.aio.AioRpcError) and late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
