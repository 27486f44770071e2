"""What a benchmark can call: the mesh (gRPC or REST), the one-process monolith, scoring
alone, and raw ONNX Runtime. Each is a picklable factory that builds its client inside
the event loop of the process that runs it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import numpy as np

from infermesh.bench.loadgen import Call, TargetFactory
from services.runtime.redis_connection import RedisTarget

N_USERS, N_ITEMS = 10_000, 100_000


class RequestFailed(Exception):
    def __init__(self, status_name: str, detail: str = "") -> None:
        super().__init__(f"{status_name}: {detail}")
        self.status_name = status_name


def reference_requests(count: int = 1000, candidates: int = 200, k: int = 20, seed: int = 11) -> list[dict]:
    """The reference request mix: one random user, 200 random catalog items, k=20."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, count)
    return [
        {
            "user_id": f"u{u}",
            "candidate_ids": [f"i{i}" for i in rng.choice(N_ITEMS, candidates, replace=False)],
            "k": k,
        }
        for u in users.tolist()
    ]


async def _noop() -> None:
    return None


async def grpc_recommend(address: str, timeout: float = 5.0) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """Through the project's own client library, as a user would call the mesh."""
    from infermesh.client import AsyncMeshClient, ClientError

    client = AsyncMeshClient(address.split(","), timeout=timeout)
    requests = reference_requests()

    async def call(n: int) -> object:
        request = requests[n % len(requests)]
        try:
            return await client.recommend(request["user_id"], request["candidate_ids"], request["k"])
        except ClientError as error:
            raise RequestFailed(error.code.name, error.message) from None

    return call, client.close


async def rest_recommend(url: str, timeout: float = 5.0) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
    )
    bodies = [json.dumps(r).encode() for r in reference_requests()]
    headers = {"content-type": "application/json"}

    async def call(n: int) -> object:
        async with session.post(url, data=bodies[n % len(bodies)], headers=headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise RequestFailed(f"HTTP {response.status}", payload[:200].decode(errors="replace"))
            return payload

    return call, session.close


async def monolith(
    redis: str | RedisTarget, model_path: str, namespace: str
) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The same pipeline in one process: same Redis reads, same model, same ranking chain
    (seen-items filter from the same Redis, category cap), no RPC. `redis`: a URL, or one
    with its credentials and TLS files."""
    import onnxruntime as ort

    from services.features.layout import FEATURE_DIM
    from services.features.store import FeatureStore
    from services.ranking.chain import Candidates, Chain
    from services.ranking.rank import decode
    from services.ranking.service import RankingSettings, build_seen_store, build_stages

    target = RedisTarget.of(redis)
    client = target.async_client()
    store = FeatureStore(client, namespace, max_items=1000)
    ranking = RankingSettings(**target.settings_values(), namespace=namespace)
    seen = build_seen_store(ranking)
    chain = Chain(build_stages(ranking, seen))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    requests = reference_requests()

    async def call(n: int) -> object:
        request = requests[n % len(requests)]
        rows = await store.get(request["user_id"], request["candidate_ids"])
        matrix = np.frombuffer(rows.model_input, dtype="<f4").reshape(rows.rows, -1)
        scores = session.run(None, {"features": matrix})[0]
        ranked = decode(rows.rows, scores.tobytes(), rows.item_categories, rows.item_present)
        return await chain.rank(
            Candidates(
                item_ids=request["candidate_ids"],
                scores=ranked.scores,
                categories=ranked.categories,
                present=ranked.present,
                embeddings=matrix[:, FEATURE_DIM:],
                user_id=request["user_id"],
                max_per_category=5,
                k=request["k"],
            )
        )

    async def close() -> None:
        await client.aclose()
        if seen is not None:
            await seen.close()

    return call, close


async def scoring_infer(address: str, batch: int, model: str = "ranker") -> tuple[Call, Callable[[], Awaitable[None]]]:
    import grpc

    from services.genproto.inference import grpc_predict_v2_pb2 as pb
    from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from services.runtime.channels import open_channel

    channel = open_channel(address, traced=False)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    rows = np.random.default_rng(0).standard_normal((batch, 64)).astype("<f4")
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=[batch, 64])
    request.raw_input_contents.append(rows.tobytes())

    async def call(n: int) -> object:
        try:
            return await stub.ModelInfer(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            raise RequestFailed(error.code().name, error.details() or "") from None

    return call, channel.close


async def raw_onnxruntime(model_path: str, batch: int, threads: int = 1) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    rows = np.random.default_rng(0).standard_normal((batch, 64)).astype("<f4")

    async def call(n: int) -> object:
        return session.run(None, {"features": rows})

    return call, _noop


def factory(kind: str, **options: object) -> TargetFactory:
    builders: dict[str, Callable[..., Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]] = {
        "grpc": grpc_recommend,
        "rest": rest_recommend,
        "monolith": monolith,
        "scoring": scoring_infer,
        "onnxruntime": raw_onnxruntime,
    }
    if kind not in builders:
        raise ValueError(f"unknown target {kind!r}; choose from {', '.join(builders)}")
    return partial(builders[kind], **options)  # type: ignore[return-value]


def default_model_path(data_dir: Path) -> str:
    from infermesh.workload.seed import model_path

    return str(model_path(data_dir))
