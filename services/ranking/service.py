"""gRPC adapter of ranking: RankingService over the configurable chain (chain.py).

Ranking stays SERVING whatever Redis does: Redis only feeds the seen filter, and a request
whose filter cannot run is ranked without it, with "seen_filter" in skipped_stages, a
warning logged and ranking_skipped_stages_total{stage} counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
from services.genproto.infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.runtime.errors import InvalidArgument
from services.runtime.logs import get_logger
from services.runtime.metrics import Metrics
from services.runtime.settings import ServerSettings, SettingsError, load_settings
from services.runtime.telemetry import (
    ATTR_ITEMS,
    ATTR_K,
    SPAN_RANKING_PREFIX,
    set_attributes,
    stage_span,
)
from services.runtime.topology import HEALTH_SERVICE_NAMES, RANKING
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
    Rules,
    SeenFilter,
    Stage,
    piecewise_linear,
    platt,
)
from services.ranking.layout import DEFAULT_NAMESPACE
from services.ranking.rank import decode, decode_embeddings
from services.ranking.seen import LOOKUPS, SeenStore, StageSkipped

log = get_logger(__name__)

DEFAULT_CHAIN = "seen_filter,rules,calibration,category_cap,mmr"


@dataclass(frozen=True)
class RankingSettings(ServerSettings):
    port: int = 30400
    max_items: int = 10_000
    # The stages, comma-separated, in the order they run; leave one out to turn it off.
    chain: str = DEFAULT_CHAIN
    # seen_filter: the Redis holding the `<namespace>:seen:<user_id>` sets.
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = DEFAULT_NAMESPACE
    # Longest the filter waits on Redis; never more than half the caller's remaining deadline.
    redis_timeout_seconds: float = 0.1
    # After this many consecutive Redis failures requests skip the filter without calling
    # Redis; one request tries again every redis_retry_seconds.
    redis_failures_to_skip: int = 3
    redis_retry_seconds: float = 1.0
    # members (SMEMBERS: cheapest while seen sets are kept small) | ismember (SMISMEMBER:
    # reply bounded by the request, for long histories). See services/ranking/seen.py.
    seen_lookup: str = "members"
    # rules: comma-separated category ids never returned, and bounds on the score as it is
    # at the rules' place in the chain (infinite: no bound).
    rules_deny_categories: str = ""
    rules_min_score: float = -math.inf
    rules_max_score: float = math.inf
    # calibration: none | platt (sigmoid(a * logit(score) + b); temperature T is a = 1/T,
    # b = 0) | piecewise (linear through calibration_points "x:y,x:y,...", x increasing,
    # y non-decreasing). calibration_score: what the scores are, probability | logit.
    calibration: str = "none"
    calibration_a: float = 1.0
    calibration_b: float = 0.0
    calibration_score: str = "probability"
    calibration_points: str = ""
    # mmr: lambda 1 is pure relevance (the stage does not run); lower trades relevance for
    # diversity among the first mmr_top_n items. It runs only on requests with embeddings.
    mmr_lambda: float = 1.0
    mmr_top_n: int = 100


def _stage_names(spec: str) -> list[str]:
    names = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [name for name in names if name not in STAGE_NAMES]
    if unknown:
        raise SettingsError(f"RANKING_CHAIN: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGE_NAMES)}")
    if len(set(names)) != len(names):
        raise SettingsError(f"RANKING_CHAIN={spec!r}: a stage appears twice")
    return names


def _deny_list(spec: str) -> list[int]:
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise SettingsError(
            f"RANKING_RULES_DENY_CATEGORIES={spec!r}: expected comma-separated category ids, e.g. 3,17"
        ) from None


def _points(spec: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    try:
        for part in spec.split(","):
            if part.strip():
                x, y = part.split(":")
                xs.append(float(x))
                ys.append(float(y))
    except ValueError:
        raise SettingsError(f"RANKING_CALIBRATION_POINTS={spec!r}: expected x:y pairs, e.g. 0:0,0.5:0.2,1:1") from None
    return xs, ys


def _calibration(settings: RankingSettings) -> Calibration:
    method = settings.calibration.strip().lower()
    try:
        if method == "none":
            return Calibration(None, "none")
        if method == "platt":
            if settings.calibration_score not in ("probability", "logit"):
                raise ValueError(
                    f"RANKING_CALIBRATION_SCORE must be probability or logit, not {settings.calibration_score!r}"
                )
            function = platt(
                settings.calibration_a,
                settings.calibration_b,
                settings.calibration_score,
            )
            return Calibration(
                function,
                f"platt a={settings.calibration_a:g} b={settings.calibration_b:g}",
            )
        if method == "piecewise":
            return Calibration(piecewise_linear(*_points(settings.calibration_points)), "piecewise")
    except ValueError as error:
        raise SettingsError(f"RANKING_CALIBRATION={method}: {error}") from None
    raise SettingsError(f"RANKING_CALIBRATION={settings.calibration!r}: expected none, platt or piecewise")


def build_stages(settings: RankingSettings, store: SeenStore | None) -> list[Stage]:
    """The configured stages; every setting is checked here, at start, never per request."""
    stages: list[Stage] = []
    for name in _stage_names(settings.chain):
        if name == SEEN_FILTER:
            if store is None:
                raise SettingsError(
                    "RANKING_REDIS_URL is empty but RANKING_CHAIN has seen_filter: set one or drop the other"
                )
            stages.append(SeenFilter(store))
        elif name == RULES:
            if settings.rules_min_score > settings.rules_max_score:
                raise SettingsError("RANKING_RULES_MIN_SCORE is above RANKING_RULES_MAX_SCORE: no item could pass")
            stages.append(
                Rules(
                    _deny_list(settings.rules_deny_categories),
                    settings.rules_min_score,
                    settings.rules_max_score,
                )
            )
        elif name == CALIBRATION:
            stages.append(_calibration(settings))
        elif name == CATEGORY_CAP:
            stages.append(CategoryCap())
        elif name == MMR:
            try:
                stages.append(Mmr(settings.mmr_lambda, settings.mmr_top_n))
            except ValueError as error:
                raise SettingsError(f"RANKING_MMR_LAMBDA / RANKING_MMR_TOP_N: {error}") from None
    return stages


def build_seen_store(settings: RankingSettings) -> SeenStore | None:
    if not settings.redis_url or SEEN_FILTER not in _stage_names(settings.chain):
        return None
    if settings.redis_failures_to_skip < 1:
        raise SettingsError(f"RANKING_REDIS_FAILURES_TO_SKIP must be >= 1, got {settings.redis_failures_to_skip}")
    if settings.seen_lookup not in LOOKUPS:
        raise SettingsError(f"RANKING_SEEN_LOOKUP={settings.seen_lookup!r}: expected {' or '.join(LOOKUPS)}")
    return SeenStore.from_url(
        settings.redis_url,
        settings.namespace,
        settings.redis_timeout_seconds,
        settings.redis_failures_to_skip,
        settings.redis_retry_seconds,
        settings.seen_lookup,
    )


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, settings: RankingSettings, chain: Chain | None = None) -> None:
        self._settings = settings
        # Without a chain (a servicer built on its own), one from the settings, uncounted.
        self._chain = chain or Chain(build_stages(settings, build_seen_store(settings)))

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        n = len(request.item_ids)
        if n > self._settings.max_items:
            raise InvalidArgument(f"at most {self._settings.max_items} items per request, got {n}")
        set_attributes({ATTR_ITEMS: n})  # on the Rank server span
        ranked = decode(n, request.scores, request.item_categories, request.item_present)
        embeddings = decode_embeddings(n, request.item_embeddings, request.embedding_dim)
        candidates = Candidates(
            item_ids=request.item_ids,
            scores=ranked.scores,
            categories=ranked.categories,
            present=ranked.present,
            embeddings=embeddings,
            user_id=request.user_id,
            max_per_category=request.max_per_category,
            k=request.k,
            offset=request.offset,
            explain=request.explain,
            time_remaining=context.time_remaining(),
        )
        # The whole chain and the page cut: the stages' spans are its children.
        with stage_span(SPAN_RANKING_PREFIX, "top_k", {ATTR_K: request.k}):
            result = await self._chain.rank(candidates)
        ids = request.item_ids
        page = result.page.tolist()
        scores = result.scores[result.page].tolist()
        categories = ranked.categories[result.page].tolist()
        response = ranking_pb2.RankResponse(
            items=[
                ranking_pb2.RankedItem(item_id=ids[i], score=s, category=c)
                for i, s, c in zip(page, scores, categories, strict=True)
            ],
            total_items=result.total,
            skipped_stages=result.skipped,
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


class RankingService:
    name = RANKING
    grpc_services = (HEALTH_SERVICE_NAMES[RANKING],)

    def __init__(self, settings: RankingSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
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
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(RankingServicer(self.settings, self.chain), server)

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


def build() -> tuple[RankingService, RankingSettings]:
    settings = load_settings(RankingSettings, RANKING)
    return RankingService(settings), settings
