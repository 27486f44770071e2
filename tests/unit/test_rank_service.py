"""Ranking's settings (RANKING_*) become the chain or fail at start naming the variable; the
servicer decodes, validates and fills the response (called directly, no network)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.genproto.infermesh.ranking.v1 import ranking_pb2
from services.ranking.chain import Calibration, Candidates, CategoryCap, Chain, Mmr, Outcome, Rules, SeenFilter
from services.ranking.rank import RankInput, top_k
from services.ranking.service import (
    RankingServicer,
    RankingSettings,
    build_seen_store,
    build_stages,
)
from services.runtime.errors import INTERNAL_ERROR_MESSAGE, InfermeshError, InvalidArgument, status_for
from services.runtime.settings import SettingsError, load_settings


def settings(**env: str) -> RankingSettings:
    return load_settings(RankingSettings, {f"RANKING_{k.upper()}": v for k, v in env.items()})


def stages(s: RankingSettings) -> list:
    return build_stages(s, build_seen_store(s))


def test_default_chain_order_and_stage_settings() -> None:
    built = stages(settings())
    assert [type(stage) for stage in built] == [SeenFilter, Rules, Calibration, CategoryCap, Mmr]
    assert built[4].lam == 1.0  # relevance only unless configured

    custom = stages(
        settings(
            chain="category_cap, calibration,rules",
            rules_deny_categories="3, 17",
            rules_min_score="0.1",
            calibration="platt",
            calibration_a="2",
            calibration_b="-1",
        )
    )
    assert [stage.name for stage in custom] == ["category_cap", "calibration", "rules"]
    assert custom[2].deny.tolist() == [3, 17] and custom[2].min_score == 0.1 and custom[2].max_score == np.inf
    assert custom[1].function(np.array([0.5]))[0] == pytest.approx(1 / (1 + np.exp(1.0)))
    piecewise = stages(settings(chain="calibration", calibration="piecewise", calibration_points="0:0,0.5:0.2,1:1"))
    assert piecewise[0].function(np.array([0.25, 0.75])).tolist() == pytest.approx([0.1, 0.6])


@pytest.mark.parametrize(
    ("env", "phrase"),
    [
        ({"chain": "seen_filter,shuffle"}, "RANKING_CHAIN='seen_filter,shuffle': unknown stage(s) shuffle"),
        ({"chain": "mmr,mmr"}, "RANKING_CHAIN='mmr,mmr': a stage appears twice"),
        ({"rules_deny_categories": "3,shoes"}, "RANKING_RULES_DENY_CATEGORIES='3,shoes': expected comma-separated"),
        ({"rules_min_score": "0.9", "rules_max_score": "0.1"}, "RANKING_RULES_MIN_SCORE is above RANKING_RULES_MAX"),
        ({"calibration": "isotonic"}, "RANKING_CALIBRATION='isotonic': Input should be 'none', 'platt' or 'piecewise'"),
        ({"calibration": "platt", "calibration_a": "-1"}, "RANKING_CALIBRATION_A='-1': Input should be greater than 0"),
        (
            {"calibration": "platt", "calibration_score": "odds"},
            "RANKING_CALIBRATION_SCORE='odds': Input should be 'prob",
        ),
        (
            {"calibration": "piecewise", "calibration_points": "0:0,1"},
            "RANKING_CALIBRATION_POINTS='0:0,1': expected x:y",
        ),
        (
            {"calibration": "piecewise", "calibration_points": "0:1,1:0"},
            "RANKING_CALIBRATION_POINTS='0:1,1:0': piecewise",
        ),
        ({"calibration": "piecewise"}, "RANKING_CALIBRATION_POINTS='': a piecewise-linear map needs at least two"),
        ({"mmr_lambda": "1.5"}, "RANKING_MMR_LAMBDA='1.5': Input should be less than or equal to 1"),
        ({"redis_url": ""}, "RANKING_REDIS_URL is empty but RANKING_CHAIN has seen_filter"),
        ({"seen_lookup": "scan"}, "RANKING_SEEN_LOOKUP='scan': Input should be 'members' or 'ismember'"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_variable(env: dict[str, str], phrase: str) -> None:
    with pytest.raises(SettingsError) as info:
        stages(settings(**env))
    assert phrase in str(info.value)


def test_no_redis_is_fine_without_the_seen_filter() -> None:
    s = settings(redis_url="", chain="category_cap")
    assert build_seen_store(s) is None and [stage.name for stage in stages(s)] == ["category_cap"]


class Context:
    def time_remaining(self) -> float | None:
        return None


def rank_request(n: int = 30, **fields) -> ranking_pb2.RankRequest:
    rng = np.random.default_rng(5)
    return ranking_pb2.RankRequest(
        item_ids=[f"i{i}" for i in range(n)],
        scores=rng.random(n).astype("<f4").tobytes(),
        item_categories=rng.integers(0, 4, n).astype("<i4").tobytes(),
        **fields,
    )


async def test_servicer_fills_items_total_and_explanations() -> None:
    servicer = RankingServicer(settings(chain="category_cap,mmr", redis_url=""))
    request = rank_request(k=5, max_per_category=2, offset=2, explain=True)
    reply = await servicer.Rank(request, Context())
    scores = np.frombuffer(request.scores, "<f4")
    categories = np.frombuffer(request.item_categories, "<i4")
    whole = top_k(RankInput(scores, categories, np.ones(30, bool)), 100, 2)
    assert [item.item_id for item in reply.items] == [f"i{i}" for i in whole[2:7].tolist()]
    assert [item.score for item in reply.items] == scores[whole[2:7]].tolist()
    assert reply.total_items == len(whole) == 8 and list(reply.skipped_stages) == []
    assert [e.item_id for e in reply.explanations] == list(request.item_ids)
    for explanation in reply.explanations:
        assert explanation.effects[0].stage == "order" and explanation.effects[-1].stage in (
            "category_cap",
            "pagination",
        )
    # Nothing explained unless asked.
    assert not (await servicer.Rank(rank_request(k=5), Context())).explanations


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ({"item_embeddings": b"\0" * 30 * 4 * 3, "embedding_dim": 4}, "30 items x embedding_dim 4 need 480"),
        ({"item_embeddings": b"\0" * 30 * 4 * 8, "embedding_dim": 0}, "set embedding_dim"),
        ({"offset": 40}, "offset 40 is beyond the ranked list of 30 items"),
        ({"k": 0}, "k must be positive"),
    ],
)
async def test_servicer_rejects_bad_input_with_actionable_messages(fields: dict, phrase: str) -> None:
    servicer = RankingServicer(settings(chain="category_cap,mmr", redis_url="", mmr_lambda="0.5"))
    base = {"k": 5}
    with pytest.raises(InvalidArgument) as info:
        await servicer.Rank(rank_request(**{**base, **fields}), Context())
    assert phrase in str(info.value)


async def test_servicer_runs_mmr_on_embeddings_when_lambda_is_below_one() -> None:
    n = 30
    # Items 0..14 are near-copies of one vector and outscore items 15..29 (another vector).
    embeddings = np.zeros((n, 4), "<f4")
    embeddings[:15, 0] = 1
    embeddings[15:, 1] = 1
    scores = np.linspace(1.0, 0.5, n).astype("<f4")
    request = ranking_pb2.RankRequest(
        item_ids=[f"i{i}" for i in range(n)],
        scores=scores.tobytes(),
        item_categories=np.zeros(n, "<i4").tobytes(),
        item_embeddings=embeddings.tobytes(),
        embedding_dim=4,
        k=2,
    )
    relevance = await RankingServicer(settings(chain="mmr", redis_url="")).Rank(request, Context())
    diverse = await RankingServicer(settings(chain="mmr", redis_url="", mmr_lambda="0.5")).Rank(request, Context())
    assert [i.item_id for i in relevance.items] == ["i0", "i1"]
    assert [i.item_id for i in diverse.items] == ["i0", "i15"]
    # Each answer tells the caller whether the chain reads embeddings at all.
    assert relevance.item_embeddings_unused and not diverse.item_embeddings_unused


@pytest.mark.parametrize(
    ("chain", "mmr_lambda", "unused"),
    [("rules,category_cap", "0.5", True), ("category_cap,mmr", "1.0", True), ("category_cap,mmr", "0.7", False)],
)
async def test_answers_say_whether_the_chain_reads_embeddings(chain: str, mmr_lambda: str, unused: bool) -> None:
    servicer = RankingServicer(settings(chain=chain, redis_url="", mmr_lambda=mmr_lambda))
    request = rank_request(k=3)
    alone = await servicer.Rank(request, Context())
    batch = await servicer.RankBatch(ranking_pb2.RankBatchRequest(requests=[request, request]), Context())
    assert [alone.item_embeddings_unused] + [r.response.item_embeddings_unused for r in batch.results] == [unused] * 3


async def rank_alone(servicer: RankingServicer, request: ranking_pb2.RankRequest) -> ranking_pb2.RankResult:
    """The result Rank gives the request alone, in a batch result's shape."""
    try:
        return ranking_pb2.RankResult(response=await servicer.Rank(request, Context()), status={})
    except InfermeshError as error:
        return ranking_pb2.RankResult(status={"code": status_for(error).value[0], "message": str(error)})


def batch_cases() -> list[ranking_pb2.RankRequest]:
    rng = np.random.default_rng(8)
    embeddings = rng.standard_normal((30, 4)).astype("<f4").tobytes()
    short_scores = rank_request(k=5)
    short_scores.scores = b"\0" * 8  # 2 scores for 30 items
    return [
        rank_request(k=5),
        rank_request(k=3, offset=4, explain=True, max_per_category=2),
        rank_request(k=5, item_embeddings=embeddings, embedding_dim=4, user_id="u7"),
        short_scores,
        rank_request(k=0),
        rank_request(k=5, offset=40),
        rank_request(n=12, k=20, max_per_category=1, explain=True),
    ]


async def test_rank_batch_answers_each_request_as_rank_does_alone() -> None:
    servicer = RankingServicer(settings(chain="category_cap,mmr", redis_url="", mmr_lambda="0.5"))
    requests = batch_cases()
    reply = await servicer.RankBatch(ranking_pb2.RankBatchRequest(requests=requests), Context())
    assert len(reply.results) == len(requests)
    for request, result in zip(requests, reply.results, strict=False):
        assert result.SerializeToString() == (await rank_alone(servicer, request)).SerializeToString()
    codes = [result.status.code for result in reply.results]
    assert codes == [0, 0, 0, 3, 3, 3, 0]  # INVALID_ARGUMENT fails the request alone
    assert reply.results[3].status.message == "scores has 8 bytes; 30 items need 120 (<f4 each)"
    assert len(reply.results[1].response.explanations) == 30


async def test_rank_batch_over_the_limit_is_rejected_whole() -> None:
    servicer = RankingServicer(settings(chain="category_cap", redis_url="", max_batch_requests="2"))
    with pytest.raises(InvalidArgument, match="at most 2 requests per RankBatch call, got 3"):
        await servicer.RankBatch(ranking_pb2.RankBatchRequest(requests=[rank_request()] * 3), Context())


class FailsForUser(CategoryCap):
    """A stage with a bug that only one user's requests reach."""

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        if c.user_id == "boom":
            raise RuntimeError("secret detail of the bug")
        return await super().run(c, order)


async def test_an_unexpected_error_is_internal_for_its_request_only_and_its_span_counts_requests() -> None:
    servicer = RankingServicer(settings(chain="category_cap", redis_url=""), Chain([FailsForUser()]))
    requests = [rank_request(k=5, max_per_category=2, user_id=u) for u in ("u1", "boom", "")]
    span = TracerProvider().get_tracer("test").start_span("/infermesh.ranking.v1.RankingService/RankBatch")
    with trace.use_span(span, end_on_exit=True):
        reply = await servicer.RankBatch(ranking_pb2.RankBatchRequest(requests=requests), Context())
    assert span.attributes["infermesh.batch.requests"] == 3
    statuses = [(r.status.code, r.status.message) for r in reply.results]
    assert statuses == [(0, ""), (grpc.StatusCode.INTERNAL.value[0], INTERNAL_ERROR_MESSAGE), (0, "")]
    assert not reply.results[1].HasField("response")
    assert reply.results[0].response == await servicer.Rank(requests[0], Context())
