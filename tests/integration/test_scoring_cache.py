"""The opt-in prediction cache on a real Redis: hits skip inference, and a Redis outage
turns the cache off without failing a single request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis

from infermesh.up.supervisor import free_port, start_redis
from infermesh.workload import modelgen
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.runtime.metrics import exposition as exposition_of
from services.scoring.service import ScoringService
from tests.scoring_server import running_scoring, server_settings


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30
    while True:
        outcome = check()
        if await outcome if asyncio.iscoroutine(outcome) else outcome:
            return
        if loop.time() > give_up:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.05)


def repository(root: Path) -> Path:
    modelgen.write_config(root, "cached", {"max_batch_size": 64, "response_cache": {"enable": True, "ttl_seconds": 60}})
    modelgen.write_version(root, "cached", 1, modelgen.mlp_model(1))
    modelgen.write_config(root, "plain", {"max_batch_size": 64})
    modelgen.write_version(root, "plain", 1, modelgen.mlp_model(1))
    return root


@asynccontextmanager
async def serving(
    root: Path, **settings: Any
) -> AsyncIterator[tuple[ScoringService, pb_grpc.GRPCInferenceServiceStub]]:
    async with running_scoring(server_settings(repository(root), **settings)) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.settings.port}") as channel:
            yield service, pb_grpc.GRPCInferenceServiceStub(channel)


def infer_request(model: str, rows: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.tobytes())
    return request


async def stats(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    return (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))).model_stats[0]


async def test_identical_requests_are_answered_from_the_cache(tmp_path: Path, redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    rows = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    async with serving(tmp_path, cache_redis_url=redis_server.url) as (service, stub):
        first = await stub.ModelInfer(infer_request("cached", rows, "a"))
        await eventually(lambda: bool(client.keys("scoring:cache:cached:1:*")), "response stored")
        second = await stub.ModelInfer(infer_request("cached", rows, "b"))
        other = await stub.ModelInfer(infer_request("cached", rows + 1, "c"))
        await stub.ModelInfer(infer_request("plain", rows))
        await stub.ModelInfer(infer_request("plain", rows))
        cached, plain = await stats(stub, "cached"), await stats(stub, "plain")
        exposition = exposition_of(service.metrics.registry)[0].decode()
    (key,) = client.keys("scoring:cache:cached:1:*")[:1] or [None]
    assert key is not None and 0 < client.ttl(key) <= 60
    assert client.keys("scoring:cache:plain:*") == []
    assert (first.id, second.id) == ("a", "b")
    assert second.raw_output_contents == first.raw_output_contents and second.model_version == "1"
    assert other.raw_output_contents != first.raw_output_contents
    assert (cached.inference_stats.cache_hit.count, cached.inference_stats.cache_miss.count) == (1, 2)
    assert cached.inference_count == 6  # the hit ran no model
    assert plain.inference_stats.cache_hit.count == plain.inference_stats.cache_miss.count == 0
    assert 'nv_cache_num_hits_per_model{model="cached",version="1"} 1.0' in exposition
    assert 'nv_cache_num_misses_per_model{model="cached",version="1"} 2.0' in exposition
    client.delete(*client.keys("scoring:cache:cached:1:*"))


async def test_redis_outage_turns_the_cache_off_and_never_fails_a_request(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(tmp_path / "redis", port, tmp_path / "logs", persist=False)
    rows = np.ones((2, 64), np.float32)
    try:
        async with serving(tmp_path / "models", cache_redis_url=url, cache_retry_seconds=0.2) as (service, stub):
            expected = (await stub.ModelInfer(infer_request("cached", rows))).raw_output_contents
            server.terminate()
            server.wait(timeout=10)
            during = await asyncio.gather(*(stub.ModelInfer(infer_request("cached", rows + i)) for i in range(20)))
            again = await stub.ModelInfer(infer_request("cached", rows))
            down = exposition_of(service.metrics.registry)[0].decode()
            server = start_redis(tmp_path / "redis", port, tmp_path / "logs", persist=False)

            async def hit() -> bool:  # back on: a request is stored, then answered from Redis
                await stub.ModelInfer(infer_request("cached", rows))
                return (await stats(stub, "cached")).inference_stats.cache_hit.count > 0

            await eventually(hit, "cache used again after Redis came back")
            up = exposition_of(service.metrics.registry)[0].decode()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert len(during) == 20 and again.raw_output_contents == expected
    assert "scoring_prediction_cache_available 0.0" in down
    assert "scoring_prediction_cache_available 1.0" in up


async def test_an_unreachable_cache_from_the_start_is_harmless(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
    async with serving(tmp_path, cache_redis_url=url) as (_, stub):
        replies = await asyncio.gather(
            *(stub.ModelInfer(infer_request("cached", np.ones((1, 64), np.float32))) for _ in range(5))
        )
    assert {r.model_version for r in replies} == {"1"}
