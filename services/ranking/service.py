"""gRPC adapter of ranking: RankingService over the configurable chain (chain.py).

Ranking stays SERVING whatever Redis does: Redis only feeds the seen filter, and a request
whose filter cannot run is ranked without it, with "seen_filter" in skipped_stages, a
warning logged and ranking_skipped_stages_total{stage} counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import grpc
import numpy as np
from prometheus_client import Histogram
from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from services.ranking.chain import (
    CALIBRATION,
    CATEGORY_CAP,
    MMR,
    RULES,
    SEEN_FILTER,
    STAGE_NAMES,
    Calibration,
    Candidates,
    CategoryCap,
    Chain,
    Mmr,
    Ranked,
    Rules,
    SeenFilter,
    Stage,
    piecewise_linear,
    platt,
)
from services.ranking.layout import DEFAULT_NAMESPACE
from services.ranking.rank import decode, decode_embeddings
from services.ranking.seen import SeenLookup, SeenStore, StageSkipped
from services.runtime.errors import InvalidArgument, rpc_status
from services.runtime.limits import DEFAULT_MAX_ID_LENGTH, check_length, check_lengths
from services.runtime.logs import get_logger
from services.runtime.metrics import Metrics
from services.runtime.pipeline import CalibrationStage, MmrStage, PipelineFile, RulesStage, pipeline_from_env
from services.runtime.redis_connection import RedisClientSettings, RedisTarget
from services.runtime.redis_keys import DEFAULT_REDIS_URL
from services.runtime.settings import ServerSettings, listen_port, load_settings
from services.runtime.telemetry import (
    ATTR_BATCH_REQUESTS,
    ATTR_ITEMS,
    ATTR_K,
    SPAN_RANKING_PREFIX,
    set_attributes,
    stage_span,
)
from services.runtime.topology import HEALTH_SERVICE_NAMES, RANKING

log = get_logger(__name__)

DEFAULT_CHAIN = "seen_filter,rules,calibration,category_cap,mmr"
# ranking_batch_requests: requests per RankBatch call (the gateway's coalescing).
BATCH_REQUESTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_RANK_BATCH = "/infermesh.ranking.v1.RankingService/RankBatch"


class RankingSettings(ServerSettings, RedisClientSettings):
    """Ranking: the chain of stages between scores and the page returned."""

    model_config = SettingsConfigDict(env_prefix=f"{RANKING.upper()}_")

    port: int = listen_port(30400)
    max_items: int = Field(10_000, ge=1, description="Most items one Rank request may carry.")
    max_id_length: int = Field(
        DEFAULT_MAX_ID_LENGTH, ge=1, description="Longest user_id or item id a Rank request may carry, in characters."
    )
    max_batch_requests: int = Field(
        64,
        ge=1,
        description=(
            "Most requests one RankBatch call may carry (each up to max_items items); "
            "more fail the whole call with INVALID_ARGUMENT."
        ),
    )
    chain: str = Field(
        DEFAULT_CHAIN,
        description=(
            f"The stages, comma-separated, in the order they run; leave one out to turn it off. "
            f"Known: {', '.join(STAGE_NAMES)}. This and every stage setting below, when set, wins over "
            f"the pipeline file's ranking.stages (INFERMESH_PIPELINE), which gives the rest."
        ),
    )
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis holding the `<namespace>:seen:<user_id>` sets of seen_filter; empty: no seen_filter.",
    )
    namespace: str = Field(DEFAULT_NAMESPACE, min_length=1, description="Key prefix of the seen sets in Redis.")
    # A seen set's SMEMBERS takes well under a millisecond; a hung Redis costs the requests
    # that meet it (the first few, then one trial per redis_retry_seconds) this much.
    redis_timeout_seconds: float = Field(
        0.05,
        gt=0,
        description="Longest seen_filter waits on Redis; never more than half the caller's remaining deadline.",
    )
    redis_failures_to_skip: int = Field(
        3,
        ge=1,
        description="After this many consecutive Redis failures, requests skip seen_filter without calling Redis.",
    )
    redis_retry_seconds: float = Field(
        1.0, gt=0, description="While seen_filter is skipped, one request tries Redis again this often."
    )
    seen_lookup: SeenLookup = Field(
        "members",
        description=(
            "members (SMEMBERS: cheapest while seen sets are small) or ismember (SMISMEMBER: a reply "
            "bounded by the request, for long histories)."
        ),
    )
    rules_deny_categories: str = Field("", description="rules: comma-separated category ids never returned, e.g. 3,17.")
    rules_min_score: float = Field(
        -math.inf,
        description=(
            "rules: items scoring below this, as scored at the rules' place in the chain, are dropped; -inf: none."
        ),
    )
    rules_max_score: float = Field(
        math.inf,
        description=(
            "rules: items scoring above this, as scored at the rules' place in the chain, are dropped; inf: none."
        ),
    )
    calibration: Literal["none", "platt", "piecewise"] = Field(
        "none",
        description=(
            "calibration: none; platt (sigmoid(a * logit(score) + b); a temperature T is a = 1/T, b = 0); "
            "piecewise (linear through calibration_points)."
        ),
    )
    calibration_a: float = Field(1.0, gt=0, description="platt: the slope a (> 0, so the order is kept).")
    calibration_b: float = Field(0.0, description="platt: the offset b.")
    calibration_score: Literal["probability", "logit"] = Field(
        "probability", description="platt: what the incoming scores are, probabilities or logits."
    )
    calibration_points: str = Field(
        "",
        description="piecewise: x:y points, e.g. 0:0,0.5:0.2,1:1; x increasing, y non-decreasing, at least two.",
    )
    mmr_lambda: float = Field(
        1.0,
        ge=0,
        le=1,
        description=(
            "mmr: 1 is pure relevance (the stage does not run); lower trades relevance for diversity among "
            "the first mmr_top_n items. Runs only on requests with embeddings."
        ),
    )
    mmr_top_n: int = Field(100, ge=1, description="mmr: how many of the top items are re-ordered for diversity.")

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration_any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("chain")
    @classmethod
    def _known_stages(cls, spec: str) -> str:
        _stage_names(spec)
        return spec

    @field_validator("rules_deny_categories")
    @classmethod
    def _category_ids(cls, spec: str) -> str:
        _deny_list(spec)
        return spec

    @field_validator("calibration_points")
    @classmethod
    def _xy_pairs(cls, spec: str) -> str:
        _points(spec)
        return spec

    @model_validator(mode="after")
    def _consistent(self) -> RankingSettings:
        variable = self.variable
        if SEEN_FILTER in _stage_names(self.chain) and not self.redis_url:
            raise ValueError(
                f"{variable('redis_url')} is empty but {variable('chain')} has seen_filter: set one or drop the other"
            )
        if self.rules_min_score > self.rules_max_score:
            raise ValueError(
                f"{variable('rules_min_score')} is above {variable('rules_max_score')}: no item could pass"
            )
        if self.calibration == "piecewise":
            try:
                piecewise_linear(*_points(self.calibration_points))
            except ValueError as error:
                raise ValueError(f"{variable('calibration_points')}={self.calibration_points!r}: {error}") from None
        return self

    def seen_redis(self) -> RedisTarget | None:
        """The Redis of seen_filter, when the chain has it; SettingsError when the credentials clash."""
        if not self.redis_url or SEEN_FILTER not in _stage_names(self.chain):
            return None
        return self.redis_target(self.redis_url)


def _stage_names(spec: str) -> list[str]:
    names = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in names if name not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGE_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError("a stage appears twice")
    return names


def _deny_list(spec: str) -> list[int]:
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError("expected comma-separated category ids, e.g. 3,17") from None


def _points(spec: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    try:
        for part in spec.split(","):
            if part.strip():
                x, y = part.split(":")
                xs.append(float(x))
                ys.append(float(y))
    except ValueError:
        raise ValueError("expected x:y pairs, e.g. 0:0,0.5:0.2,1:1") from None
    return xs, ys


def _calibration(settings: RankingSettings) -> Calibration:
    if settings.calibration == "platt":
        function = platt(settings.calibration_a, settings.calibration_b, settings.calibration_score)
        return Calibration(function, f"platt a={settings.calibration_a:g} b={settings.calibration_b:g}")
    if settings.calibration == "piecewise":
        return Calibration(piecewise_linear(*_points(settings.calibration_points)), "piecewise")
    return Calibration(None, "none")


def build_stages(settings: RankingSettings, store: SeenStore | None) -> list[Stage]:
    """The configured stages; RankingSettings checked every setting when it was built."""
    stages: list[Stage] = []
    for name in _stage_names(settings.chain):
        if name == SEEN_FILTER:
            if store is None:
                raise ValueError("seen_filter is in the chain but no seen store was given")
            stages.append(SeenFilter(store))
        elif name == RULES:
            stages.append(
                Rules(_deny_list(settings.rules_deny_categories), settings.rules_min_score, settings.rules_max_score)
            )
        elif name == CALIBRATION:
            stages.append(_calibration(settings))
        elif name == CATEGORY_CAP:
            stages.append(CategoryCap())
        elif name == MMR:
            stages.append(Mmr(settings.mmr_lambda, settings.mmr_top_n))
    return stages


def build_seen_store(settings: RankingSettings) -> SeenStore | None:
    seen_redis = settings.seen_redis()
    if seen_redis is None:
        return None
    return SeenStore.from_url(
        seen_redis,
        settings.namespace,
        settings.redis_timeout_seconds,
        settings.redis_failures_to_skip,
        settings.redis_retry_seconds,
        settings.seen_lookup,
    )


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(
        self, settings: RankingSettings, chain: Chain | None = None, batch_requests: Histogram | None = None
    ) -> None:
        self._settings = settings
        # Without a chain (a servicer built on its own), one from the settings, uncounted.
        self._chain = chain or Chain(build_stages(settings, build_seen_store(settings)))
        self._batch_requests = batch_requests

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        set_attributes({ATTR_ITEMS: len(request.item_ids)})  # on the Rank server span
        return await self._rank(request, self._candidates(request, context.time_remaining()))

    async def RankBatch(
        self, request: ranking_pb2.RankBatchRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankBatchResponse:
        entries = request.requests
        if self._batch_requests is not None:
            self._batch_requests.observe(len(entries))
        set_attributes({ATTR_BATCH_REQUESTS: len(entries)})  # on the call's server span
        limit = self._settings.max_batch_requests
        if len(entries) > limit:
            raise InvalidArgument(f"at most {limit} requests per RankBatch call, got {len(entries)}")
        time_remaining = context.time_remaining()
        prepared = [self._prepared(entry, time_remaining) for entry in entries]
        # The stages' reads (the seen sets) for every request at once: one Redis round trip.
        await self._chain.prefetch([c for c in prepared if isinstance(c, Candidates)])
        return ranking_pb2.RankBatchResponse(
            results=[_result(await self._ranked(e, c)) for e, c in zip(entries, prepared, strict=True)]
        )

    def _prepared(self, request: ranking_pb2.RankRequest, time_remaining: float | None) -> Candidates | Exception:
        try:
            return self._candidates(request, time_remaining)
        except Exception as error:  # noqa: BLE001 (it fails its own request alone)
            return error

    async def _ranked(
        self, request: ranking_pb2.RankRequest, candidates: Candidates | Exception
    ) -> ranking_pb2.RankResponse | Exception:
        if isinstance(candidates, Exception):
            return candidates
        try:
            return await self._rank(request, candidates)
        except Exception as error:  # noqa: BLE001 (it fails its own request alone)
            return error

    def _candidates(self, request: ranking_pb2.RankRequest, time_remaining: float | None) -> Candidates:
        """The request's items decoded and checked against its own lengths and the limits."""
        n = len(request.item_ids)
        if n > self._settings.max_items:
            raise InvalidArgument(f"at most {self._settings.max_items} items per request, got {n}")
        check_length("user_id", request.user_id, self._settings.max_id_length)
        # The checked list, not the message's field: the seen filter and the response read it again.
        item_ids = check_lengths("item_ids", request.item_ids, self._settings.max_id_length)
        ranked = decode(n, request.scores, request.item_categories, request.item_present)
        return Candidates(
            item_ids=item_ids,
            scores=ranked.scores,
            categories=ranked.categories,
            present=ranked.present,
            embeddings=decode_embeddings(n, request.item_embeddings, request.embedding_dim),
            user_id=request.user_id,
            max_per_category=request.max_per_category,
            k=request.k,
            offset=request.offset,
            explain=request.explain,
            time_remaining=time_remaining,
        )

    async def _rank(self, request: ranking_pb2.RankRequest, candidates: Candidates) -> ranking_pb2.RankResponse:
        # The whole chain and the page cut: the stages' spans are its children.
        with stage_span(SPAN_RANKING_PREFIX, "top_k", {ATTR_K: request.k}):
            result = await self._chain.rank(candidates)
        return _response(candidates.item_ids, candidates.categories, result, not self._chain.reads_embeddings)


def _response(
    ids: Sequence[str], categories: np.ndarray, result: Ranked, embeddings_unused: bool
) -> ranking_pb2.RankResponse:
    page = result.page.tolist()
    scores = result.scores[result.page].tolist()
    response = ranking_pb2.RankResponse(
        items=[
            ranking_pb2.RankedItem(item_id=ids[i], score=s, category=c)
            for i, s, c in zip(page, scores, categories[result.page].tolist(), strict=True)
        ],
        total_items=result.total,
        skipped_stages=result.skipped,
        item_embeddings_unused=embeddings_unused,
    )
    if result.explanations is not None:
        response.explanations.extend(
            ranking_pb2.ItemExplanation(
                item_id=item_id,
                effects=[ranking_pb2.StageEffect(**e._asdict()) for e in effects],
            )
            for item_id, effects in zip(ids, result.explanations, strict=True)
        )
    return response


def _result(outcome: ranking_pb2.RankResponse | Exception) -> ranking_pb2.RankResult:
    if isinstance(outcome, Exception):
        return ranking_pb2.RankResult(status=rpc_status(outcome, _RANK_BATCH))
    return ranking_pb2.RankResult(response=outcome, status=rpc_status(None))


class RankingService:
    name = RANKING
    grpc_services: tuple[str, ...] = (HEALTH_SERVICE_NAMES[RANKING],)

    def __init__(self, settings: RankingSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
        self._batch_requests = self.metrics.histogram(
            f"{self.name}_batch_requests", "Requests per RankBatch call", buckets=BATCH_REQUESTS_BUCKETS
        )
        self._skipped = self.metrics.counter(
            f"{self.name}_skipped_stages",
            "Requests ranked without a stage that applied but could not run (e.g. seen_filter, Redis down)",
            ["stage"],
        )
        self.seen_store = build_seen_store(settings)
        self.chain = Chain(build_stages(settings, self.seen_store), on_skip=self._stage_skipped)
        for stage in self.chain.names:
            self._skipped.labels(stage)  # every series exists from the start, at 0
        log.info("ranking chain", stages=list(self.chain.names))

    def _stage_skipped(self, stage: str, skip: StageSkipped) -> None:
        self._skipped.labels(stage).inc()
        if skip.warn:
            log.warning("ranking stage skipped", stage=stage, reason=str(skip))

    def register(self, server: grpc.aio.Server) -> None:
        servicer = RankingServicer(self.settings, self.chain, self._batch_requests)
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)

    async def start(self) -> None:
        pass

    async def readiness(self) -> tuple[bool, str]:
        # Ranking can always rank: Redis only feeds an optional filter.
        if self.seen_store is not None and self.seen_store.breaker.is_open:
            return True, "serving; seen filter skipped while redis is unreachable"
        return True, "serving"

    async def close(self) -> None:
        if self.seen_store is not None:
            await self.seen_store.close()


def pipeline_settings(settings: RankingSettings, pipeline: PipelineFile) -> RankingSettings:
    """`settings` with the pipeline's chain and stage parameters wherever the environment
    set none (a RANKING_CHAIN, RANKING_MMR_LAMBDA, ... that is set wins over the file)."""
    stages = pipeline.spec.ranking.stages
    values: dict[str, object] = {"chain": ",".join(stage.stage for stage in stages)}
    for stage in stages:
        if isinstance(stage, RulesStage):
            values["rules_deny_categories"] = ",".join(str(c) for c in stage.deny_categories)
            values["rules_min_score"], values["rules_max_score"] = stage.min_score, stage.max_score
        elif isinstance(stage, CalibrationStage):
            values.update(calibration=stage.method, calibration_a=stage.a, calibration_b=stage.b)
            values["calibration_score"] = stage.score
            values["calibration_points"] = ",".join(f"{x!r}:{y!r}" for x, y in stage.points)
        elif isinstance(stage, MmrStage):
            values["mmr_lambda"], values["mmr_top_n"] = stage.lambda_, stage.top_n
    explicit = {name: getattr(settings, name) for name in settings.model_fields_set}
    return RankingSettings(**{**values, **explicit})


def build() -> tuple[RankingService, RankingSettings]:
    settings = pipeline_settings(load_settings(RankingSettings), pipeline_from_env())
    seen_redis = settings.seen_redis()
    if seen_redis is not None:
        # Refused credentials stop the service here, before its server exists, in one line naming
        # the variable; an unreachable Redis does not (seen_filter is skipped).
        seen_redis.check()
    return RankingService(settings), settings
