"""The gateway pipeline's feature-related parts, with stand-in stubs: the degraded flag is
carried to the Recommend result, and the optional retrieval stage runs only on request."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.pipeline import Pipeline, PipelineConfig, Stubs
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.infermesh.features.v1 import features_pb2
from services.genproto.infermesh.ranking.v1 import ranking_pb2
from services.runtime.errors import InvalidArgument


class FakeFeatures:
    def __init__(self, degraded: bool = False, retrieved: list[str] | None = None) -> None:
        self.degraded = degraded
        self.retrieved = retrieved if retrieved is not None else ["i7", "i8"]
        self.requests: list[object] = []

    async def GetFeatures(self, request: features_pb2.GetFeaturesRequest, timeout: float):
        self.requests.append(request)
        n = len(request.item_ids)
        return features_pb2.GetFeaturesResponse(
            model_input=features_pb2.DenseMatrix(data=bytes(n * 64 * 4), rows=n, columns=64, datatype="FP32"),
            item_categories=np.arange(n, dtype="<i4").tobytes(),
            item_present=np.ones(n, np.uint8).tobytes(),
            degraded=self.degraded,
        )

    async def RetrieveCandidates(self, request: features_pb2.RetrieveCandidatesRequest, timeout: float):
        self.requests.append(request)
        return features_pb2.RetrieveCandidatesResponse(item_ids=self.retrieved[: request.count], degraded=False)


class FakeScoring:
    async def ModelInfer(self, request: inference_pb2.ModelInferRequest, timeout: float):
        rows = request.inputs[0].shape[0]
        reply = inference_pb2.ModelInferResponse(model_name="ranker", model_version="1")
        reply.raw_output_contents.append(np.linspace(1, 0, rows, dtype="<f4").tobytes())
        return reply


class FakeRanking:
    async def Rank(self, request: ranking_pb2.RankRequest, timeout: float):
        return ranking_pb2.RankResponse(
            items=[ranking_pb2.RankedItem(item_id=i, score=1.0, category=0) for i in request.item_ids[: request.k]]
        )


def pipeline(features: FakeFeatures) -> Pipeline:
    return Pipeline(Stubs(features, FakeScoring(), FakeRanking()), PipelineConfig())  # type: ignore[arg-type]


async def test_degraded_features_flag_the_recommendation() -> None:
    assert (await pipeline(FakeFeatures(degraded=True)).recommend("u1", ["i1", "i2"], 2, 1.0)).degraded
    assert not (await pipeline(FakeFeatures()).recommend("u1", ["i1", "i2"], 2, 1.0)).degraded


async def test_no_candidates_and_no_retrieval_is_still_invalid() -> None:
    with pytest.raises(InvalidArgument, match="candidate_ids"):
        await pipeline(FakeFeatures()).recommend("u1", [], 2, 1.0)
    with pytest.raises(InvalidArgument, match="retrieve_candidates"):
        await pipeline(FakeFeatures()).recommend("u1", [], 2, 1.0, retrieve=5_000)


async def test_retrieval_stage_supplies_the_candidates() -> None:
    features = FakeFeatures()
    result = await pipeline(features).recommend("u1", [], 5, 1.0, retrieve=2)
    assert [i.item_id for i in result.items] == ["i7", "i8"]
    assert list(result.stage_ms) == ["retrieval", "features", "scoring", "ranking"]
    assert isinstance(features.requests[0], features_pb2.RetrieveCandidatesRequest)
    assert list(features.requests[1].item_ids) == ["i7", "i8"]


async def test_given_candidates_skip_retrieval_and_empty_retrieval_returns_nothing() -> None:
    features = FakeFeatures()
    await pipeline(features).recommend("u1", ["i1"], 1, 1.0, retrieve=10)
    assert not any(isinstance(r, features_pb2.RetrieveCandidatesRequest) for r in features.requests)
    empty = await pipeline(FakeFeatures(retrieved=[])).recommend("u1", [], 3, 1.0, retrieve=10)
    assert empty.items == [] and list(empty.stage_ms) == ["retrieval"]
