"""The gateway's failure policy, pass-through fields, experiments and shadow traffic, with
stand-in stubs (the real mesh runs in tests/e2e/test_gateway_resilience.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.infermesh.features.v1 import features_pb2
from services.genproto.infermesh.ranking.v1 import ranking_pb2

from gateway.experiments import Experiments, parse
from gateway.fallback import (
    FALLBACK_MODEL_NAME,
    FeatureMatrix,
    fallback_rank,
    fallback_scores,
    feature_matrix,
    item_embeddings,
)
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline, PipelineConfig, Stubs
from gateway.shadow import ShadowRunner, compare
from services.runtime.errors import InvalidArgument, NotFound, OutOfRange
from services.runtime.metrics import Metrics
from services.features.layout import FEATURE_DIM
from services.ranking.rank import RankInput, top_k
from infermesh.workload.catalog import affinity, generate_catalog, model_input, ndcg_at_k

N = 40


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def rows_for(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return model_input(rng.standard_normal(FEATURE_DIM), rng.standard_normal((n, FEATURE_DIM)))


def matrix_for(n: int, seed: int = 0) -> FeatureMatrix:
    """rows_for(n) with the layout the feature service states: user half, then item half."""
    return FeatureMatrix(rows_for(n, seed), FEATURE_DIM)


class FakeFeatures:
    def __init__(
        self,
        degraded: bool = False,
        error: grpc.aio.AioRpcError | None = None,
        delay: float = 0.0,
        user_columns: int = FEATURE_DIM,  # 0: a feature service that predates the field
    ) -> None:
        self.degraded = degraded
        self.error = error
        self.delay = delay  # ignores its timeout, like a stage that overruns
        self.user_columns = user_columns

    async def GetFeatures(self, request: features_pb2.GetFeaturesRequest, timeout: float):
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        n = len(request.item_ids)
        return features_pb2.GetFeaturesResponse(
            model_input=features_pb2.DenseMatrix(data=rows_for(n).tobytes(), rows=n, columns=64, datatype="FP32"),
            item_categories=(np.arange(n, dtype="<i4") % 4).tobytes(),  # 4 categories
            item_present=np.ones(n, np.uint8).tobytes(),
            degraded=self.degraded,
            user_columns=self.user_columns,
        )


class FakeScoring:
    """Scores = the fallback's order reversed, so who ranked is visible in the result."""

    def __init__(self, error: grpc.aio.AioRpcError | None = None, delay: float = 0.0) -> None:
        self.error = error
        self.delay = delay
        self.requests: list[inference_pb2.ModelInferRequest] = []
        self.finished: list[str] = []

    async def ModelInfer(self, request: inference_pb2.ModelInferRequest, timeout: float):
        self.requests.append(request)
        if self.delay:
            try:
                await asyncio.wait_for(asyncio.sleep(self.delay), timeout)
            except TimeoutError:
                raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        if self.error is not None:
            raise self.error
        rows = request.inputs[0].shape[0]
        matrix = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(rows, -1)
        reply = inference_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version or "1"
        )
        scores = fallback_scores(FeatureMatrix(matrix, FEATURE_DIM), rows)
        reply.raw_output_contents.append((1.0 - scores).astype("<f4").tobytes())
        self.finished.append(request.model_version)
        return reply


class FakeRanking:
    def __init__(self, error: grpc.aio.AioRpcError | None = None, skipped: tuple[str, ...] = ()) -> None:
        self.error = error
        self.skipped = skipped
        self.requests: list[ranking_pb2.RankRequest] = []

    async def Rank(self, request: ranking_pb2.RankRequest, timeout: float):
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        scores = np.frombuffer(request.scores, "<f4")
        order = np.argsort(-scores, kind="stable")[request.offset : request.offset + request.k]
        return ranking_pb2.RankResponse(
            items=[ranking_pb2.RankedItem(item_id=request.item_ids[i], score=float(scores[i])) for i in order],
            explanations=[ranking_pb2.ItemExplanation(item_id=request.item_ids[0])] if request.explain else [],
            total_items=len(scores),
            skipped_stages=list(self.skipped),
        )


CANDIDATES = [f"i{n}" for n in range(N)]


def make(
    features: FakeFeatures | None = None,
    scoring: FakeScoring | None = None,
    ranking: FakeRanking | None = None,
    experiments: Experiments | None = None,
    metrics: GatewayMetrics | None = None,
    **config: object,
) -> Pipeline:
    stubs = Stubs(features or FakeFeatures(), scoring or FakeScoring(), ranking or FakeRanking())  # type: ignore[arg-type]
    return Pipeline(stubs, PipelineConfig(**config), experiments=experiments, metrics=metrics)  # type: ignore[arg-type]


def expected_fallback_ids(k: int, max_per_category: int = 5) -> list[str]:
    scores = fallback_scores(matrix_for(N), N)
    response = fallback_rank(
        CANDIDATES, scores, (np.arange(N, dtype="<i4") % 4).tobytes(), b"", k, 0, max_per_category
    )
    return [i.item_id for i in response.items]


# ---------------------------------------------------------------- fallback computations


def test_fallback_scores_follow_the_user_item_dot_product() -> None:
    rows = rows_for(N)
    scores = fallback_scores(matrix_for(N), N)
    dots = rows[:, FEATURE_DIM:] @ rows[0, :FEATURE_DIM]
    assert scores.dtype == np.float32 and ((scores > 0) & (scores < 1)).all()
    assert list(np.argsort(-scores, kind="stable")) == list(np.argsort(-dots, kind="stable"))
    assert item_embeddings(matrix_for(N)) == np.ascontiguousarray(rows[:, FEATURE_DIM:]).tobytes()
    # An unknown layout, or halves of different widths (no dot product), give neutral scores.
    assert (fallback_scores(None, 3) == 0.5).all()
    assert (fallback_scores(FeatureMatrix(rows, FEATURE_DIM - 4), N) == 0.5).all()


def features_reply(
    rows: np.ndarray, user_columns: int, data: bytes | None = None
) -> features_pb2.GetFeaturesResponse:
    n, columns = rows.shape
    return features_pb2.GetFeaturesResponse(
        model_input=features_pb2.DenseMatrix(
            data=rows.tobytes() if data is None else data, rows=n, columns=columns, datatype="FP32"
        ),
        user_columns=user_columns,
    )


def test_the_row_layout_comes_from_the_features_reply() -> None:
    rows = rows_for(N)
    matrix = feature_matrix(features_reply(rows, 24))
    assert matrix is not None and (matrix.user_columns, matrix.item_columns) == (24, 64 - 24)
    assert (matrix.items == rows[:, 24:]).all()
    # No stated layout (a service predating user_columns), one with no item columns, or
    # bytes that do not fill the matrix: unknown.
    assert feature_matrix(features_reply(rows, 0)) is None
    assert feature_matrix(features_reply(rows, 64)) is None
    assert feature_matrix(features_reply(rows, 32, data=rows.tobytes()[:-4])) is None


@pytest.mark.parametrize("seed", range(5))
def test_fallback_rank_agrees_with_the_ranking_services_top_k(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.choice([0.1, 0.2, 0.3, np.nan], n).astype("<f4")  # many ties and NaNs
    categories = rng.integers(0, 6, n).astype("<i4")
    present = (rng.random(n) < 0.8).astype(np.uint8)
    ids = [f"i{i}" for i in range(n)]
    ranked = fallback_rank(ids, scores, categories.tobytes(), present.tobytes(), 25, 0, 3)
    expected = top_k(RankInput(scores, categories, present.astype(bool)), 25, 3)
    assert [i.item_id for i in ranked.items] == [ids[i] for i in expected]


def test_fallback_ranking_is_far_better_than_chance_on_the_reference_catalog() -> None:
    catalog = generate_catalog(n_users=20, n_items=2_000, n_categories=10)
    rng = np.random.default_rng(1)
    fallback, chance = [], []
    for user in range(20):
        items = rng.choice(2_000, 200, replace=False)
        rows = model_input(catalog.user_vecs[user], catalog.item_vecs[items])
        truth = affinity(catalog.user_vecs[user], catalog.item_vecs[items])
        fallback.append(ndcg_at_k(fallback_scores(FeatureMatrix(rows, FEATURE_DIM), 200), truth))
        chance.append(ndcg_at_k(rng.random(200), truth))
    assert np.mean(fallback) > np.mean(chance) + 0.05, (np.mean(fallback), np.mean(chance))


def test_fallback_rank_caps_categories_orders_by_score_and_pages() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, np.nan, 0.95], dtype="<f4")
    categories = np.array([1, 1, 1, 2, 2, 3, 3], dtype="<i4").tobytes()
    present = np.array([1, 1, 1, 1, 0, 1, 1], dtype=np.uint8).tobytes()
    ids = [f"i{n}" for n in range(7)]
    full = fallback_rank(ids, scores, categories, present, 10, 0, 2)
    # i4 is absent; category 1 keeps its best two; NaN ranks last; ties never reorder.
    assert [i.item_id for i in full.items] == ["i6", "i0", "i1", "i3", "i5"]
    assert full.total_items == 5
    page = fallback_rank(ids, scores, categories, present, 2, 2, 2)
    assert [i.item_id for i in page.items] == ["i1", "i3"] and page.total_items == 5
    assert [i.category for i in page.items] == [1, 2]


def test_compare_reports_the_disagreement() -> None:
    a = np.linspace(0, 1, 50, dtype="<f4")
    assert compare(a, a) == (0.0, 1.0)
    diff, overlap = compare(a, a[::-1].copy())
    assert diff == pytest.approx(0.5, abs=0.02) and overlap == 0.0


# ---------------------------------------------------------------- the happy path


async def test_new_fields_pass_through_to_ranking_and_back() -> None:
    ranking = FakeRanking()
    result = await make(ranking=ranking).recommend("u1", CANDIDATES, 5, 1.0, explain=True, offset=3)
    sent = ranking.requests[0]
    assert (sent.user_id, sent.offset, sent.explain, sent.k, sent.embedding_dim) == ("u1", 3, True, 5, 32)
    assert sent.item_embeddings == item_embeddings(matrix_for(N))
    assert result.total_items == N and [e.item_id for e in result.explanations] == ["i0"]
    assert not result.degraded and result.degraded_reasons == []
    assert (result.model_name, result.model_version) == ("ranker", "1")
    assert list(result.stage_ms) == ["features", "scoring", "ranking"]


async def test_embeddings_can_be_left_out() -> None:
    ranking = FakeRanking()
    await make(ranking=ranking, send_item_embeddings=False).recommend("u1", CANDIDATES, 5, 1.0)
    assert ranking.requests[0].item_embeddings == b"" and ranking.requests[0].embedding_dim == 0


async def test_a_features_reply_without_a_row_layout_degrades_to_neutral_scores_and_no_embeddings() -> None:
    ranking = FakeRanking()
    features = FakeFeatures(user_columns=0)
    scoring = FakeScoring(error=rpc_error(grpc.StatusCode.UNAVAILABLE))
    result = await make(features=features, scoring=scoring, ranking=ranking).recommend("u1", CANDIDATES, 5, 1.0)
    sent = ranking.requests[0]
    assert sent.item_embeddings == b"" and sent.embedding_dim == 0
    assert (np.frombuffer(sent.scores, "<f4") == 0.5).all()
    # Equal scores keep the request order.
    assert result.degraded_reasons == ["scoring_unavailable"] and [i.item_id for i in result.items] == CANDIDATES[:5]


async def test_skipped_ranking_stages_and_degraded_features_are_reasons() -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    result = await make(
        features=FakeFeatures(degraded=True), ranking=FakeRanking(skipped=("seen_filter",)), metrics=metrics
    ).recommend("u1", CANDIDATES, 5, 1.0)
    assert result.degraded
    assert result.degraded_reasons == ["features_store_unavailable", "ranking_seen_filter_skipped"]
    assert metrics.degraded.labels("ranking_seen_filter_skipped")._value.get() == 1
    assert metrics.requests.labels("none", "none", "degraded")._value.get() == 1


# ---------------------------------------------------------------- the failure policy


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.NOT_FOUND,  # the arm's model version is not loaded
    ],
)
async def test_scoring_failure_ranks_by_the_fallback_score_and_flags_it(code: grpc.StatusCode) -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    result = await make(scoring=FakeScoring(error=rpc_error(code)), metrics=metrics).recommend(
        "u1", CANDIDATES, 10, 1.0
    )
    assert result.degraded_reasons == ["scoring_unavailable"]
    assert (result.model_name, result.model_version) == (FALLBACK_MODEL_NAME, "")
    # The real ranking service ranked the fallback scores: best fallback score first.
    assert [i.item_id for i in result.items] == expected_fallback_ids(10, max_per_category=0)
    assert "scoring_fallback" in result.stage_ms
    assert metrics.degraded.labels("scoring_unavailable")._value.get() == 1


async def test_slow_scoring_is_cut_at_its_budget_and_the_request_answers_in_time() -> None:
    scoring = FakeScoring(delay=5.0)
    started = time.monotonic()
    result = await make(scoring=scoring).recommend("u1", CANDIDATES, 10, 0.5)
    elapsed = time.monotonic() - started
    assert result.degraded_reasons == ["scoring_unavailable"]
    # Scoring's share of 0.5 s: 0.9 * 0.35 / 0.75 * 0.5 = 0.21 s; the rest is fast.
    assert 0.18 < result.stage_ms["scoring"] / 1000 < 0.3 and elapsed < 0.4


async def test_stages_over_budget_are_not_called_and_the_fallbacks_still_answer() -> None:
    scoring, ranking = FakeScoring(), FakeRanking()
    # Features overrun into the reserve (6 ms of 60): nothing is left for the later stages.
    result = await make(scoring=scoring, ranking=ranking, features=FakeFeatures(delay=0.055)).recommend(
        "u1", CANDIDATES, 10, 0.06
    )
    assert scoring.requests == [] and ranking.requests == []
    assert result.degraded_reasons == ["scoring_unavailable", "ranking_unavailable"]
    assert [i.item_id for i in result.items] == expected_fallback_ids(10)


async def test_ranking_failure_serves_top_k_with_the_category_cap() -> None:
    result = await make(
        scoring=FakeScoring(error=rpc_error(grpc.StatusCode.UNAVAILABLE)),
        ranking=FakeRanking(error=rpc_error(grpc.StatusCode.UNAVAILABLE)),
        max_per_category=2,
    ).recommend("u1", CANDIDATES, 10, 1.0, offset=2)
    assert result.degraded_reasons == ["scoring_unavailable", "ranking_unavailable"]
    # 4 categories x 2 = 8 items in the whole list; the page skips the first 2.
    assert result.total_items == 8
    assert [i.item_id for i in result.items] == expected_fallback_ids(10, max_per_category=2)[2:]
    assert list(result.stage_ms) == ["features", "scoring", "scoring_fallback", "ranking", "ranking_fallback"]


async def test_ranking_fallback_uses_the_model_scores_when_scoring_worked() -> None:
    result = await make(ranking=FakeRanking(error=rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))).recommend(
        "u1", CANDIDATES, 3, 1.0
    )
    assert result.degraded_reasons == ["ranking_unavailable"]
    assert result.model_version == "1"
    # FakeScoring's scores reverse the fallback order, category cap of 5 applies.
    reversed_ids = fallback_rank(
        CANDIDATES,
        1.0 - fallback_scores(matrix_for(N), N),
        (np.arange(N, dtype="<i4") % 4).tobytes(),
        b"",
        3,
        0,
        5,
    )
    assert [i.item_id for i in result.items] == [i.item_id for i in reversed_ids.items]


@pytest.mark.parametrize("stage", ["scoring", "ranking"])
@pytest.mark.parametrize(
    ("code", "raised"), [(grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.OUT_OF_RANGE, OutOfRange)]
)
async def test_client_errors_from_a_stage_are_not_masked(
    stage: str, code: grpc.StatusCode, raised: type[Exception]
) -> None:
    error = rpc_error(code, "bad k")
    pipeline = make(scoring=FakeScoring(error=error)) if stage == "scoring" else make(ranking=FakeRanking(error=error))
    # The caller gets the stage's own status (OUT_OF_RANGE is not UNAVAILABLE, which is retried).
    with pytest.raises(raised, match=f"{stage}: bad k"):
        await pipeline.recommend("u1", CANDIDATES, 10, 1.0)


async def test_feature_failures_stay_errors() -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    with pytest.raises(NotFound, match="features: unknown user"):
        await make(
            features=FakeFeatures(error=rpc_error(grpc.StatusCode.NOT_FOUND, "unknown user")), metrics=metrics
        ).recommend("u1", CANDIDATES, 10, 1.0)
    assert metrics.requests.labels("none", "none", "error")._value.get() == 1


async def test_an_empty_candidate_id_is_invalid() -> None:
    # Rejected before any stage runs: a features call would fail with UNAVAILABLE instead.
    features = FakeFeatures(error=rpc_error(grpc.StatusCode.UNAVAILABLE, "must not be called"))
    with pytest.raises(InvalidArgument, match=r"candidate_ids\[2\] is empty"):
        await make(features=features).recommend("u1", ["i1", "i2", ""], 10, 1.0)


async def test_offset_is_validated() -> None:
    with pytest.raises(InvalidArgument, match="offset"):
        await make().recommend("u1", CANDIDATES, 10, 1.0, offset=5_000)


# ---------------------------------------------------------------- experiments and shadow


async def test_the_users_arm_picks_the_model_version() -> None:
    scoring = FakeScoring()
    metrics = GatewayMetrics(Metrics("gateway"))
    experiments = Experiments(None, "ranker")
    experiments.config = parse(
        {
            "name": "e1",
            "arms": [{"name": "a", "version": 1, "percent": 50}, {"name": "b", "version": 2, "percent": 50}],
        },
        "ranker",
    )
    pipeline = make(scoring=scoring, experiments=experiments, metrics=metrics)
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        arm = experiments.assign(user)
        result = await pipeline.recommend(user, CANDIDATES, 5, 1.0)
        assert result.experiment_arm == arm.arm
        assert scoring.requests[-1].model_version == arm.version == result.model_version
    total = sum(metrics.requests.labels("e1", arm, "ok")._value.get() for arm in ("a", "b"))
    assert total == 6


async def test_shadow_is_fired_bounded_and_never_awaited() -> None:
    scoring = FakeScoring()
    metrics = GatewayMetrics(Metrics("gateway"))
    experiments = Experiments(None, "ranker")
    experiments.config = parse(
        {
            "name": "e1",
            "arms": [{"name": "main", "version": 1, "percent": 100}],
            "shadow": {"version": 2, "max_in_flight": 2},
        },
        "ranker",
    )
    pipeline = make(scoring=scoring, experiments=experiments, metrics=metrics)

    slow_shadow = asyncio.Event()
    primary_infer = scoring.ModelInfer
    shadowed: list[inference_pb2.ModelInferRequest] = []

    async def infer(request: inference_pb2.ModelInferRequest, timeout: float):
        if request.model_version == "2":
            shadowed.append(request)
            await slow_shadow.wait()  # the candidate hangs until released
        return await primary_infer(request, timeout)

    scoring.ModelInfer = infer  # type: ignore[method-assign]
    started = time.monotonic()
    results = [await pipeline.recommend("u1", CANDIDATES, 5, 1.0) for _ in range(5)]
    # Five answers while the shadow calls hang: the response path never waits for them.
    assert time.monotonic() - started < 0.5
    assert all(r.model_version == "1" and not r.degraded for r in results)
    assert pipeline.shadow.in_flight == 2
    assert metrics.shadow.labels("ranker", "2", "dropped")._value.get() == 3
    await asyncio.sleep(0.01)  # let the background tasks reach the candidate
    assert len(shadowed) == 2 and shadowed[0].raw_input_contents == scoring.requests[0].raw_input_contents

    slow_shadow.set()
    for _ in range(100):
        if pipeline.shadow.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert metrics.shadow.labels("ranker", "2", "ok")._value.get() == 2
    # FakeScoring returns the same scores for both versions: no disagreement.
    assert metrics.shadow_diff.labels("ranker", "2")._sum.get() == 0.0
    await pipeline.shadow.close()


async def test_shadow_failures_are_counted_not_raised() -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    runner = ShadowRunner(FakeScoring(error=rpc_error(grpc.StatusCode.UNAVAILABLE)), metrics)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    request = inference_pb2.ModelInferRequest(model_name="ranker")
    request.inputs.add(name="features", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(rows_for(2).tobytes())
    assert runner.submit(shadow, request, np.zeros(2, "<f4"))
    await asyncio.sleep(0.05)
    assert runner.in_flight == 0
    assert metrics.shadow.labels("ranker", "2", "error")._value.get() == 1


async def test_no_shadow_when_the_arm_already_is_the_candidate() -> None:
    scoring = FakeScoring()
    experiments = Experiments(None, "ranker")
    experiments.config = parse(
        {"name": "e1", "arms": [{"name": "b", "version": 2, "percent": 100}], "shadow": {"version": 2}}, "ranker"
    )
    await make(scoring=scoring, experiments=experiments).recommend("u1", CANDIDATES, 5, 1.0)
    await asyncio.sleep(0.01)
    assert [r.model_version for r in scoring.requests] == ["2"]
