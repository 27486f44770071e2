"""The gateway's failure policy, pass-through fields, experiments and shadow traffic, with
stand-in stubs (the real mesh runs in tests/e2e/test_gateway_resilience.py)."""

from __future__ import annotations

import asyncio
import contextvars
import time

import grpc
import numpy as np
import pytest

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
from infermesh.workload.catalog import affinity, generate_catalog, model_input, ndcg_at_k
from services.features.layout import FEATURE_DIM
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.infermesh.features.v1 import features_pb2
from services.genproto.infermesh.ranking.v1 import ranking_pb2
from services.ranking.rank import RankInput, top_k
from services.runtime.errors import InvalidArgument, NotFound, OutOfRange
from services.runtime.metrics import Metrics

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
        self.embeddings_unused = False  # what its answers say of its chain

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
            item_embeddings_unused=self.embeddings_unused,
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
    response = fallback_rank(CANDIDATES, scores, (np.arange(N, dtype="<i4") % 4).tobytes(), b"", k, 0, max_per_category)
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


def features_reply(rows: np.ndarray, user_columns: int, data: bytes | None = None) -> features_pb2.GetFeaturesResponse:
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


async def test_embeddings_are_sent_only_while_ranking_reads_them() -> None:
    ranking = FakeRanking()
    pipeline = make(ranking=ranking)
    ranking.embeddings_unused = True  # a chain without MMR: its first answer says so
    for _ in range(3):
        await pipeline.recommend("u1", CANDIDATES, 5, 1.0)
    ranking.embeddings_unused = False  # e.g. a replica with MMR on took over
    for _ in range(2):
        await pipeline.recommend("u1", CANDIDATES, 5, 1.0)
    # The first request sends them (nothing is known yet); each later one follows the
    # answer before it, so the first after the change still goes without.
    sent = [len(r.item_embeddings) > 0 and r.embedding_dim == 32 for r in ranking.requests]
    assert sent == [True, False, False, False, True]
    assert ranking.requests[4].item_embeddings == item_embeddings(matrix_for(N))


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


async def test_after_a_scoring_fallback_ranking_gets_the_same_item_embeddings() -> None:
    # The fallback's matrix of the rows is reused for them: the same bytes as when scoring works.
    ranking = FakeRanking()
    await make(scoring=FakeScoring(error=rpc_error(grpc.StatusCode.UNAVAILABLE)), ranking=ranking).recommend(
        "u1", CANDIDATES, 5, 1.0
    )
    sent = ranking.requests[0]
    assert sent.item_embeddings == item_embeddings(matrix_for(N)) and sent.embedding_dim == 32


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
    ("code", "raised"),
    [(grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.OUT_OF_RANGE, OutOfRange)],
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


async def test_shadow_is_batched_bounded_and_never_awaited() -> None:
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
    # Batches of 2 copies (no timer in this test), at most 2 copies waiting for a call.
    pipeline.shadow = ShadowRunner(scoring, metrics, flush_seconds=60, max_batch_requests=2, max_queued=2)  # type: ignore[arg-type]

    slow_shadow = asyncio.Event()
    primary_infer = scoring.ModelInfer
    shadowed: list[inference_pb2.ModelInferRequest] = []

    async def infer(request: inference_pb2.ModelInferRequest, timeout: float):
        if request.model_version == "2":
            shadowed.append(request)
            await slow_shadow.wait()  # the candidate hangs until released
        return await primary_infer(request, timeout)

    scoring.ModelInfer = infer  # type: ignore[method-assign]
    # Eight answers while the shadow calls hang: the response path never waits for them.
    results = [await asyncio.wait_for(pipeline.recommend("u1", CANDIDATES, 5, 1.0), 5) for _ in range(8)]
    assert all(r.model_version == "1" and not r.degraded for r in results)
    # Copies 1-4 went as two calls (max_in_flight), 5-6 wait for a call, 7-8 were dropped.
    assert (pipeline.shadow.in_flight, pipeline.shadow.queued) == (2, 2)
    assert metrics.shadow.labels("ranker", "2", "dropped")._value.get() == 2
    await asyncio.sleep(0.01)  # let the background tasks reach the candidate
    primaries = [r for r in scoring.requests if r.model_version == "1"]
    assert len(shadowed) == 2 and shadowed[0].inputs[0].shape == [2 * N, 64]
    assert shadowed[0].raw_input_contents[0] == primaries[0].raw_input_contents[0] + primaries[1].raw_input_contents[0]

    slow_shadow.set()
    for _ in range(100):
        if pipeline.shadow.in_flight == pipeline.shadow.queued == 0:
            break
        await asyncio.sleep(0.01)
    assert len(shadowed) == 3  # the waiting pair went when a call returned
    assert metrics.shadow.labels("ranker", "2", "ok")._value.get() == 6
    # Compared per request: FakeScoring returns the same scores for both versions.
    assert observations(metrics.shadow_diff.labels("ranker", "2")) == 6
    assert metrics.shadow_diff.labels("ranker", "2")._sum.get() == 0.0
    assert metrics.batch_requests.labels("shadow")._sum.get() == 6
    await pipeline.shadow.close()


def observations(histogram: object) -> float:
    return sum(b.get() for b in histogram._buckets)  # type: ignore[attr-defined]


class RowScoring(FakeScoring):
    """A model that scores each row on its own, as the real MLP does: a row's score does not
    depend on which rows share its call."""

    async def ModelInfer(self, request: inference_pb2.ModelInferRequest, timeout: float):
        self.requests.append(request)
        rows = request.inputs[0].shape[0]
        matrix = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(rows, -1)
        reply = inference_pb2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version)
        reply.raw_output_contents.append(np.tanh(matrix.sum(axis=1)).astype("<f4").tobytes())
        return reply


def shadow_request(rows: int, seed: int) -> inference_pb2.ModelInferRequest:
    request = inference_pb2.ModelInferRequest(model_name="ranker", model_version="1")
    request.inputs.add(name="features", datatype="FP32", shape=[rows, 64])
    request.outputs.add(name="score")
    request.raw_input_contents.append(rows_for(rows, seed).tobytes())
    return request


async def alone(request: inference_pb2.ModelInferRequest) -> np.ndarray:
    reply = await RowScoring().ModelInfer(request, 1.0)
    return np.frombuffer(reply.raw_output_contents[0], "<f4")


async def test_a_shadow_batch_is_split_back_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    scoring = RowScoring()
    metrics = GatewayMetrics(Metrics("gateway"))
    runner = ShadowRunner(scoring, metrics, flush_seconds=0.01)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    compared: list[tuple[np.ndarray, np.ndarray]] = []

    def spy(primary: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
        compared.append((primary, candidate.copy()))
        return compare(primary, candidate)

    monkeypatch.setattr("gateway.shadow.compare", spy)
    requests = [shadow_request(rows, seed) for seed, rows in enumerate((3, 25, 1))]
    expected = [await alone(r) for r in requests]
    # Each request's primary scores: its own scores shifted, so each has its own difference.
    primaries = [scores + shift for scores, shift in zip(expected, np.array([0.0, 0.5, -0.25], "<f4"), strict=False)]
    for request, primary in zip(requests, primaries, strict=False):
        assert runner.submit(shadow, request, primary)
    assert scoring.requests == [] and runner.queued == 3  # queued, nothing sent on the request path
    for _ in range(100):
        if metrics.shadow.labels("ranker", "2", "ok")._value.get() == 3:
            break
        await asyncio.sleep(0.01)
    (sent,) = scoring.requests  # one call for the three copies
    assert (sent.model_name, sent.model_version, list(sent.inputs[0].shape)) == ("ranker", "2", [29, 64])
    assert [o.name for o in sent.outputs] == ["score"]
    assert len(compared) == 3
    for (primary, candidate), own, mine in zip(compared, expected, primaries, strict=False):
        assert primary is mine and np.array_equal(candidate, own)
    diff = metrics.shadow_diff.labels("ranker", "2")
    assert observations(diff) == 3 and diff._sum.get() == pytest.approx(0.75)
    assert metrics.shadow_overlap.labels("ranker", "2")._sum.get() == 3.0
    assert observations(metrics.shadow_latency.labels("ranker", "2")) == 1  # per call
    await runner.close()


async def test_a_shadow_batch_stays_within_its_row_cap() -> None:
    scoring = FakeScoring()
    runner = ShadowRunner(scoring, None, flush_seconds=60, max_batch_rows=6)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    for seed, rows in enumerate((3, 2, 5, 1, 7)):
        assert runner.submit(shadow, shadow_request(rows, seed), np.zeros(rows, "<f4"))
    await asyncio.sleep(0.01)
    # 3+2 (5 would overfill it), 5+1 (full), 7 alone (over the cap by itself); nothing waits.
    assert [r.inputs[0].shape[0] for r in scoring.requests] == [5, 6, 7]
    assert runner.queued == 0
    await runner.close()


async def test_a_full_shadow_queue_drops_and_counts_and_close_discards_it() -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    scoring = FakeScoring()
    runner = ShadowRunner(scoring, metrics, flush_seconds=60, max_queued=3)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    taken = [runner.submit(shadow, shadow_request(2, seed), np.zeros(2, "<f4")) for seed in range(5)]
    assert taken == [True, True, True, False, False]
    assert metrics.shadow.labels("ranker", "2", "dropped")._value.get() == 2
    # A request with no rows to copy is counted, never raised on the request path.
    assert not ShadowRunner(scoring, metrics).submit(shadow, inference_pb2.ModelInferRequest(), np.zeros(0, "<f4"))  # type: ignore[arg-type]
    assert metrics.shadow.labels("ranker", "2", "error")._value.get() == 1
    await runner.close()
    assert runner.queued == 0 and scoring.requests == []


REQUEST_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")


async def test_a_shadow_call_runs_outside_the_requests_context() -> None:
    seen: list[str] = []

    class Watching(RowScoring):
        async def ModelInfer(self, request: inference_pb2.ModelInferRequest, timeout: float):
            seen.append(REQUEST_VAR.get())
            return await super().ModelInfer(request, timeout)

    runner = ShadowRunner(Watching(), None, flush_seconds=0.01)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    REQUEST_VAR.set("u1's request")  # e.g. its trace: it ends before the copy is sent
    assert runner.submit(shadow, shadow_request(2, 0), np.zeros(2, "<f4"))
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == [""]
    await runner.close()


async def test_shadow_failures_are_counted_per_request_not_raised() -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    scoring = FakeScoring(error=rpc_error(grpc.StatusCode.UNAVAILABLE))
    runner = ShadowRunner(scoring, metrics, max_batch_requests=2)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    for seed in range(2):
        assert runner.submit(shadow, shadow_request(2, seed), np.zeros(2, "<f4"))
    await asyncio.sleep(0.05)
    assert runner.in_flight == 0 and len(scoring.requests) == 1
    assert metrics.shadow.labels("ranker", "2", "error")._value.get() == 2


async def test_shadow_scores_that_do_not_fit_the_batch_are_a_mismatch() -> None:
    metrics = GatewayMetrics(Metrics("gateway"))
    runner = ShadowRunner(FakeScoring(), metrics, max_batch_requests=2)  # type: ignore[arg-type]
    shadow = parse({"shadow": {"version": 2}}, "ranker").shadow
    assert shadow is not None
    # The second request's primary has one score more than its rows: the split cannot hold.
    runner.submit(shadow, shadow_request(2, 0), np.zeros(2, "<f4"))
    runner.submit(shadow, shadow_request(2, 1), np.zeros(3, "<f4"))
    await asyncio.sleep(0.05)
    assert metrics.shadow.labels("ranker", "2", "mismatch")._value.get() == 2


async def test_no_shadow_when_the_arm_already_is_the_candidate() -> None:
    scoring = FakeScoring()
    experiments = Experiments(None, "ranker")
    experiments.config = parse(
        {"name": "e1", "arms": [{"name": "b", "version": 2, "percent": 100}], "shadow": {"version": 2}}, "ranker"
    )
    await make(scoring=scoring, experiments=experiments).recommend("u1", CANDIDATES, 5, 1.0)
    await asyncio.sleep(0.01)
    assert [r.model_version for r in scoring.requests] == ["2"]
