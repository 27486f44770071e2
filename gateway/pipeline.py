"""The reference pipeline: features -> scoring -> ranking under one deadline.

Feature rows and scores travel as the bytes they arrived in: the gateway never decodes
them, it only hands them to the next stage.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from inference import grpc_predict_v2_pb2 as inference_pb2
from inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from infermesh.features.v1 import features_pb2, features_pb2_grpc
from infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.common.errors import DeadlineExceeded, InvalidArgument, from_rpc_error
from services.common.telemetry import ATTR_DEADLINE_REMAINING_MS, SPAN_GATEWAY_PREFIX, span

T = TypeVar("T")


@dataclass(frozen=True)
class PipelineConfig:
    model_name: str = "ranker"
    model_input: str = "features"
    model_output: str = "score"
    default_k: int = 20
    max_k: int = 1000
    max_candidates: int = 1000
    max_per_category: int = 5
    # Whole-request budget when the caller sets no deadline (seconds).
    default_timeout: float = 2.0


@dataclass
class Recommendation:
    items: list[ranking_pb2.RankedItem]
    model_name: str
    model_version: str
    unknown_items: int
    stage_ms: dict[str, float] = field(default_factory=dict)
    # Some features came from the feature service's cache or defaults (its Redis was unreachable).
    degraded: bool = False


@dataclass(frozen=True)
class Stubs:
    features: features_pb2_grpc.FeatureServiceStub
    scoring: inference_pb2_grpc.GRPCInferenceServiceStub
    ranking: ranking_pb2_grpc.RankingServiceStub


def validate(
    config: PipelineConfig, user_id: str, candidate_ids: list[str], k: int | None, retrieve: int = 0
) -> int:
    if not user_id:
        raise InvalidArgument("user_id is required")
    if not candidate_ids and not retrieve:
        raise InvalidArgument("candidate_ids must list at least one item (or set retrieve_candidates)")
    if len(candidate_ids) > config.max_candidates:
        raise InvalidArgument(
            f"at most {config.max_candidates} candidate_ids per request, got {len(candidate_ids)}"
        )
    if retrieve > config.max_candidates:
        raise InvalidArgument(f"retrieve_candidates must be at most {config.max_candidates}, got {retrieve}")
    k = config.default_k if k is None else k
    if not 1 <= k <= config.max_k:
        raise InvalidArgument(f"k must be between 1 and {config.max_k}, got {k}")
    return k


class Pipeline:
    def __init__(self, stubs: Stubs, config: PipelineConfig) -> None:
        self._stubs = stubs
        self.config = config

    async def recommend(
        self,
        user_id: str,
        candidate_ids: list[str],
        k: int | None,
        time_remaining: float | None,
        retrieve: int = 0,
    ) -> Recommendation:
        k = validate(self.config, user_id, candidate_ids, k, retrieve)
        # Repeated candidates would be ranked twice; keep the first of each.
        candidates = list(dict.fromkeys(candidate_ids))
        budget = self.config.default_timeout if time_remaining is None else time_remaining
        deadline = time.monotonic() + budget
        timings: dict[str, float] = {}
        config = self.config
        retrieval_degraded = False
        if not candidates:
            # Optional first stage: the feature service finds candidates by ANN over item vectors.
            retrieved = await self._stage(
                "retrieval",
                deadline,
                timings,
                lambda timeout: self._stubs.features.RetrieveCandidates(
                    features_pb2.RetrieveCandidatesRequest(user_id=user_id, count=retrieve), timeout=timeout
                ),
            )
            candidates, retrieval_degraded = list(retrieved.item_ids), retrieved.degraded
            if not candidates:
                return Recommendation([], config.model_name, "", 0, timings, retrieval_degraded)

        features = await self._stage(
            "features",
            deadline,
            timings,
            lambda timeout: self._stubs.features.GetFeatures(
                features_pb2.GetFeaturesRequest(user_id=user_id, item_ids=candidates), timeout=timeout
            ),
        )
        matrix = features.model_input
        request = inference_pb2.ModelInferRequest(model_name=config.model_name)
        request.inputs.add(name=config.model_input, datatype=matrix.datatype, shape=[matrix.rows, matrix.columns])
        request.outputs.add(name=config.model_output)
        request.raw_input_contents.append(matrix.data)
        scored = await self._stage(
            "scoring", deadline, timings, lambda timeout: self._stubs.scoring.ModelInfer(request, timeout=timeout)
        )
        ranked = await self._stage(
            "ranking",
            deadline,
            timings,
            lambda timeout: self._stubs.ranking.Rank(
                ranking_pb2.RankRequest(
                    item_ids=candidates,
                    scores=scored.raw_output_contents[0],
                    item_categories=features.item_categories,
                    item_present=features.item_present,
                    k=k,
                    max_per_category=config.max_per_category,
                ),
                timeout=timeout,
            ),
        )
        return Recommendation(
            items=list(ranked.items),
            model_name=scored.model_name,
            model_version=scored.model_version,
            unknown_items=features.missing_items,
            stage_ms=timings,
            degraded=features.degraded or retrieval_degraded,
        )

    @staticmethod
    async def _stage(
        name: str,
        deadline: float,
        timings: dict[str, float],
        call: Callable[[float], Awaitable[T]],
    ) -> T:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before the {name} stage")
        started = time.perf_counter()
        try:
            with span(SPAN_GATEWAY_PREFIX + name, {ATTR_DEADLINE_REMAINING_MS: round(remaining * 1000.0, 3)}):
                return await call(remaining)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(name, error) from None
        finally:
            timings[name] = (time.perf_counter() - started) * 1000.0
