"""The reference pipeline: [retrieval ->] features -> scoring -> ranking under one deadline.

Feature rows and scores travel as the bytes they arrived in: the gateway forwards them,
and views them with numpy only for what it computes itself (the item embeddings ranking's
diversity stage compares, and the fallbacks).

Deadline: one budget per request (the caller's gRPC deadline, else the default timeout),
split into per-stage budgets by gateway.budget.

Failure policy (docs/gateway.md has the table):

* retrieval, features: an error is the request's error (there is nothing to rank); features
  answered from the feature service's cache/defaults: "features_store_unavailable".
* scoring unavailable, slow, over budget, overloaded, or its version not loaded: fallback
  scores computed here as the pipeline file's `fallback` says (the dot product of the
  fallback vectors features sends, or one neutral score), "scoring_unavailable".
* ranking failing: top-k by score with the category cap computed here,
  "ranking_unavailable"; a ranking stage it skipped: "ranking_<stage>_skipped".
* INVALID_ARGUMENT / OUT_OF_RANGE from any stage: the error, never a fallback, which would
  hide a bad request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from gateway.budget import Budget, StageBudgets
from gateway.experiments import Assignment, Experiments
from gateway.fallback import (
    FALLBACK_MODEL_NAME,
    NEUTRAL_SCORE,
    fallback_rank,
    fallback_scores,
    feature_matrix,
    item_embeddings,
)
from gateway.metrics import GatewayMetrics
from gateway.shadow import ShadowRunner
from gateway.stage_calls import REQUEST_ERRORS, DirectCalls, StageCalls
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from services.genproto.infermesh.features.v1 import features_pb2, features_pb2_grpc
from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from services.runtime.errors import DeadlineExceeded, InvalidArgument, from_rpc_error
from services.runtime.logs import get_logger
from services.runtime.telemetry import fallback_span

T = TypeVar("T")
log = get_logger(__name__)

# Degraded reasons (RecommendResponse.degraded_reasons, gateway_degraded_responses_total).
FEATURES_DEGRADED = "features_store_unavailable"
SCORING_UNAVAILABLE = "scoring_unavailable"
RANKING_UNAVAILABLE = "ranking_unavailable"

# A stage answering these blames the request itself: the caller gets the error.
CLIENT_ERRORS = REQUEST_ERRORS  # (gateway/stage_calls.py: one set for both decisions)


def skipped_reason(stage: str) -> str:
    """A ranking stage that could not run, as a degraded reason: "ranking_seen_filter_skipped"."""
    return f"ranking_{stage}_skipped"


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
    budgets: StageBudgets = field(default_factory=StageBudgets)
    # Send the item half of the feature rows to ranking (its MMR diversity stage).
    send_item_embeddings: bool = True
    # The pipeline file's fallback: "dot_product" of the fallback vectors, or "neutral".
    fallback_scores: str = "dot_product"
    neutral_score: float = NEUTRAL_SCORE
    fallback_model_name: str = FALLBACK_MODEL_NAME


@dataclass
class Recommendation:
    items: list[ranking_pb2.RankedItem]
    model_name: str
    model_version: str
    unknown_items: int
    stage_ms: dict[str, float] = field(default_factory=dict)
    degraded_reasons: list[str] = field(default_factory=list)
    experiment: str = ""
    experiment_arm: str = ""
    explanations: list[ranking_pb2.ItemExplanation] = field(default_factory=list)
    total_items: int = 0

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)


@dataclass
class RequestState:
    """One request on its way through the stages: what each step reads, and the timings and
    degraded reasons they add."""

    assignment: Assignment
    user_id: str
    k: int
    offset: int
    explain: bool
    budget: Budget
    timings: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def degrade(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def result(self, **fields: object) -> Recommendation:
        return Recommendation(
            stage_ms=self.timings,
            degraded_reasons=self.reasons,
            experiment=self.assignment.experiment,
            experiment_arm=self.assignment.arm,
            **fields,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Scores:
    """float32 [items] and who computed them: the model, or the fallback."""

    scores: np.ndarray
    raw: bytes  # the same scores as the bytes scoring sent, forwarded to ranking as they are
    model_name: str
    model_version: str
    # The scoring call that produced them (None for the fallback): the shadow model's copy.
    request: inference_pb2.ModelInferRequest | None = None


@dataclass(frozen=True)
class Stubs:
    features: features_pb2_grpc.FeatureServiceStub
    scoring: inference_pb2_grpc.GRPCInferenceServiceStub
    ranking: ranking_pb2_grpc.RankingServiceStub


class StageFailed(Exception):
    """A stage with a fallback failed in a way the fallback may cover."""

    def __init__(self, stage: str, why: str) -> None:
        super().__init__(f"{stage}: {why}")
        self.why = why


def validate(
    config: PipelineConfig,
    user_id: str,
    candidate_ids: list[str],
    k: int | None,
    retrieve: int = 0,
    offset: int = 0,
) -> int:
    if not user_id:
        raise InvalidArgument("user_id is required")
    if not candidate_ids and not retrieve:
        raise InvalidArgument("candidate_ids must list at least one item (or set retrieve_candidates)")
    if "" in candidate_ids:
        # An empty id names no item: a caller's bug (e.g. a blank CSV cell), not an unknown item.
        raise InvalidArgument(f"candidate_ids[{candidate_ids.index('')}] is empty; every candidate needs an item id")
    if len(candidate_ids) > config.max_candidates:
        raise InvalidArgument(f"at most {config.max_candidates} candidate_ids per request, got {len(candidate_ids)}")
    if retrieve > config.max_candidates:
        raise InvalidArgument(f"retrieve_candidates must be at most {config.max_candidates}, got {retrieve}")
    k = config.default_k if k is None else k
    if not 1 <= k <= config.max_k:
        raise InvalidArgument(f"k must be between 1 and {config.max_k}, got {k}")
    if not 0 <= offset <= config.max_candidates:
        raise InvalidArgument(f"offset must be between 0 and {config.max_candidates}, got {offset}")
    return k


class Pipeline:
    def __init__(
        self,
        stubs: Stubs,
        config: PipelineConfig,
        experiments: Experiments | None = None,
        metrics: GatewayMetrics | None = None,
        shadow: ShadowRunner | None = None,
        calls: StageCalls | None = None,
    ) -> None:
        self._stubs = stubs
        # features, scoring, ranking: one call per request, or coalesced across requests.
        self._calls = calls if calls is not None else DirectCalls(stubs)
        self.config = config
        self.experiments = experiments or Experiments(None, config.model_name)
        self._metrics = metrics
        self.shadow = shadow or ShadowRunner(stubs.scoring, metrics)
        # Ranking says in each answer whether its chain reads item embeddings (only an MMR
        # stage with lambda < 1 does): ~25 KB a request of 200 items, sent only while it does.
        self._ranking_reads_embeddings = True

    async def recommend(
        self,
        user_id: str,
        candidate_ids: list[str],
        k: int | None,
        time_remaining: float | None,
        retrieve: int = 0,
        *,
        explain: bool = False,
        offset: int = 0,
    ) -> Recommendation:
        started = time.perf_counter()
        assignment = Assignment("", "", self.config.model_name, "")
        try:
            k = validate(self.config, user_id, candidate_ids, k, retrieve, offset)
            assignment = self.experiments.assign(user_id)
            result = await self._recommend(
                assignment, user_id, candidate_ids, k, time_remaining, retrieve, explain, offset
            )
        except BaseException:
            if self._metrics is not None:
                self._metrics.request(assignment.experiment, assignment.arm, "error", time.perf_counter() - started)
            raise
        if self._metrics is not None:
            outcome = "degraded" if result.degraded else "ok"
            self._metrics.request(assignment.experiment, assignment.arm, outcome, time.perf_counter() - started)
            self._metrics.degraded_reasons(result.degraded_reasons)
        return result

    async def _recommend(
        self,
        assignment: Assignment,
        user_id: str,
        candidate_ids: list[str],
        k: int,
        time_remaining: float | None,
        retrieve: int,
        explain: bool,
        offset: int,
    ) -> Recommendation:
        # Repeated candidates would be ranked twice; keep the first of each.
        candidates = list(dict.fromkeys(candidate_ids))
        total = self.config.default_timeout if time_remaining is None else time_remaining
        stages = ("features", "scoring", "ranking") if candidates else ("retrieval", "features", "scoring", "ranking")
        state = RequestState(assignment, user_id, k, offset, explain, self.config.budgets.plan(total, stages))
        if not candidates:
            candidates = await self._retrieve(state, retrieve)
            if not candidates:
                return state.result(items=[], model_name=assignment.model, model_version="", unknown_items=0)
        features = await self._features(state, candidates)
        # The rows as a matrix (feature_matrix) only where the gateway computes with them (a
        # fallback, the item embeddings): each view copies the ~50 KB of a 200-item request.
        scored = await self._score(state, features, len(candidates))
        ranked = await self._rank(state, candidates, features, scored)
        self._shadow(state.assignment, scored)
        return state.result(
            items=list(ranked.items),
            model_name=scored.model_name,
            model_version=scored.model_version,
            unknown_items=features.missing_items,
            explanations=list(ranked.explanations),
            total_items=ranked.total_items,
        )

    async def _retrieve(self, state: RequestState, count: int) -> list[str]:
        """Optional first stage: the feature service finds candidates by ANN over item vectors."""
        retrieved = await self._stage(
            "retrieval",
            state.budget,
            state.timings,
            lambda timeout: self._stubs.features.RetrieveCandidates(
                features_pb2.RetrieveCandidatesRequest(user_id=state.user_id, count=count), timeout=timeout
            ),
        )
        if retrieved.degraded:
            state.degrade(FEATURES_DEGRADED)
        return list(retrieved.item_ids)

    async def _features(self, state: RequestState, candidates: list[str]) -> features_pb2.GetFeaturesResponse:
        features = await self._stage(
            "features",
            state.budget,
            state.timings,
            lambda timeout: self._calls.features(
                features_pb2.GetFeaturesRequest(user_id=state.user_id, item_ids=candidates), timeout
            ),
        )
        if features.degraded:
            state.degrade(FEATURES_DEGRADED)
        if FEATURES_DEGRADED in state.reasons:
            # Served from the feature service's cache/defaults: make it findable in the trace.
            with fallback_span("features", "feature store degraded: cached or default features"):
                pass
        return features

    async def _score(
        self,
        state: RequestState,
        features: features_pb2.GetFeaturesResponse,
        count: int,
    ) -> Scores:
        """The model's scores for the rows, or the fallback scores when scoring fails."""
        assignment = state.assignment
        infer_request = self._infer_request(assignment, features)
        try:
            scored = await self._fallible(
                "scoring",
                state.budget,
                state.timings,
                lambda timeout: self._calls.score(infer_request, timeout),
            )
            raw_scores = scored.raw_output_contents[0] if scored.raw_output_contents else b""
            if len(raw_scores) != 4 * count:
                raise StageFailed("scoring", f"{len(raw_scores)} bytes of scores for {count} items")
        except StageFailed as failure:
            return self._fallback_scores(state, features, count, failure)
        scores = np.frombuffer(raw_scores, dtype="<f4")
        return Scores(scores, raw_scores, scored.model_name, scored.model_version, infer_request)

    def _shadow(self, assignment: Assignment, scored: Scores) -> None:
        """The shadow model's copy of the scoring call, sent once the request has its answer:
        sent earlier, it would compete with ranking for the same two cores."""
        shadow = self.experiments.config.shadow
        if scored.request is None or shadow is None:
            return
        if (shadow.model, shadow.version) != (assignment.model, assignment.version):
            self.shadow.submit(shadow, scored.request, scored.scores)

    def _infer_request(
        self, assignment: Assignment, features: features_pb2.GetFeaturesResponse
    ) -> inference_pb2.ModelInferRequest:
        """The model's inputs as features built them from the pipeline's mapping (one tensor per
        named input, each with its datatype), forwarded as the bytes they arrived in."""
        infer = inference_pb2.ModelInferRequest(model_name=assignment.model, model_version=assignment.version)
        # No named inputs: the fallback rows are the model's one input (sent once).
        for tensor in features.inputs or (features.model_input,):
            name = tensor.name or self.config.model_input  # (a features replica predating names)
            infer.inputs.add(name=name, datatype=tensor.datatype, shape=[tensor.rows, tensor.columns])
            infer.raw_input_contents.append(tensor.data)
        infer.outputs.add(name=self.config.model_output)
        return infer

    def _fallback_scores(
        self, state: RequestState, features: features_pb2.GetFeaturesResponse, count: int, failure: StageFailed
    ) -> Scores:
        state.degrade(SCORING_UNAVAILABLE)
        started = time.perf_counter()
        config = self.config
        with fallback_span("scoring", failure.why):
            vectors = feature_matrix(features) if config.fallback_scores == "dot_product" else None
            scores = fallback_scores(vectors, count, config.neutral_score)
        state.timings["scoring_fallback"] = (time.perf_counter() - started) * 1000.0
        assignment = state.assignment
        log.warning("scoring fell back", reason=failure.why, model=assignment.model, version=assignment.version)
        return Scores(scores, scores.tobytes(), config.fallback_model_name, "")

    async def _rank(
        self,
        state: RequestState,
        candidates: list[str],
        features: features_pb2.GetFeaturesResponse,
        scored: Scores,
    ) -> ranking_pb2.RankResponse:
        """Ranking's list, or top-k by score in the gateway when ranking fails."""
        rank_request = self._rank_request(state, candidates, features, scored.raw)
        try:
            ranked = await self._fallible(
                "ranking",
                state.budget,
                state.timings,
                lambda timeout: self._calls.rank(rank_request, timeout),
            )
        except StageFailed as failure:
            return self._fallback_rank(state, candidates, features, scored.scores, failure)
        self._ranking_reads_embeddings = not ranked.item_embeddings_unused
        for stage in ranked.skipped_stages:
            state.reasons.append(skipped_reason(stage))
        return ranked

    def _rank_request(
        self,
        state: RequestState,
        candidates: list[str],
        features: features_pb2.GetFeaturesResponse,
        raw_scores: bytes,
    ) -> ranking_pb2.RankRequest:
        rank_request = ranking_pb2.RankRequest(
            item_ids=candidates,
            scores=raw_scores,
            item_categories=features.item_categories,
            item_present=features.item_present,
            k=state.k,
            max_per_category=self.config.max_per_category,
            user_id=state.user_id,
            offset=state.offset,
            explain=state.explain,
        )
        if self.config.send_item_embeddings and self._ranking_reads_embeddings:
            matrix = feature_matrix(features)
            if matrix is not None:
                rank_request.item_embeddings = item_embeddings(matrix)
                rank_request.embedding_dim = matrix.item_columns
        return rank_request

    def _fallback_rank(
        self,
        state: RequestState,
        candidates: list[str],
        features: features_pb2.GetFeaturesResponse,
        scores: np.ndarray,
        failure: StageFailed,
    ) -> ranking_pb2.RankResponse:
        state.degrade(RANKING_UNAVAILABLE)
        started = time.perf_counter()
        with fallback_span("ranking", failure.why):
            ranked = fallback_rank(
                candidates,
                scores,
                features.item_categories,
                features.item_present,
                state.k,
                state.offset,
                self.config.max_per_category,
            )
        state.timings["ranking_fallback"] = (time.perf_counter() - started) * 1000.0
        log.warning("ranking fell back", reason=failure.why)
        return ranked

    @staticmethod
    async def _stage(
        name: str,
        budget: Budget,
        timings: dict[str, float],
        call: Callable[[float], Awaitable[T]],
    ) -> T:
        """A stage without a fallback: its failure is the request's."""
        try:
            return await Pipeline._timed(name, budget, timings, call)
        except StageFailed as failure:
            raise DeadlineExceeded(f"deadline passed before the {name} stage") from failure
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(name, error) from None

    @staticmethod
    async def _fallible(
        name: str,
        budget: Budget,
        timings: dict[str, float],
        call: Callable[[float], Awaitable[T]],
    ) -> T:
        """A stage with a fallback: StageFailed when the fallback should be served instead,
        the error itself when the request is at fault."""
        try:
            return await Pipeline._timed(name, budget, timings, call)
        except grpc.aio.AioRpcError as error:
            if error.code() in CLIENT_ERRORS:
                raise from_rpc_error(name, error) from None
            raise StageFailed(name, f"{error.code().name}: {error.details() or ''}"[:200]) from None

    @staticmethod
    async def _timed(
        name: str,
        budget: Budget,
        timings: dict[str, float],
        call: Callable[[float], Awaitable[T]],
    ) -> T:
        """One stage call within its budget, its time in `timings`; StageFailed when no time is
        left for it (it is then not called). Its trace span is the call's CLIENT span (it
        carries the budget), not a stage span around it: that would only repeat it."""
        timeout = budget.timeout(name)
        if timeout <= 0:
            timings[name] = 0.0
            raise StageFailed(name, "no time left in its budget")
        started = time.perf_counter()
        try:
            return await call(timeout)
        finally:
            timings[name] = (time.perf_counter() - started) * 1000.0
