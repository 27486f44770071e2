"""gRPC adapter of ranking: RankingService over rank.top_k."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from infermesh.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.metrics import Metrics
from services.common.settings import ServerSettings, load_settings
from services.common.telemetry import ATTR_ITEMS, ATTR_K, SPAN_RANKING_PREFIX, stage_span
from services.mesh.topology import HEALTH_SERVICE_NAMES, RANKING
from services.ranking.rank import decode, top_k


@dataclass(frozen=True)
class RankingSettings(ServerSettings):
    port: int = 50400
    max_items: int = 10_000


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, settings: RankingSettings) -> None:
        self._settings = settings

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        n = len(request.item_ids)
        if n > self._settings.max_items:
            raise InvalidArgument(f"at most {self._settings.max_items} items per request, got {n}")
        with stage_span(SPAN_RANKING_PREFIX, "decode", {ATTR_ITEMS: n}):
            ranked = decode(n, request.scores, request.item_categories, request.item_present)
        with stage_span(SPAN_RANKING_PREFIX, "top_k", {ATTR_K: request.k}):
            chosen = top_k(ranked, request.k, request.max_per_category)
        with stage_span(SPAN_RANKING_PREFIX, "respond", {ATTR_ITEMS: len(chosen)}):
            ids = request.item_ids
            scores = ranked.scores[chosen].tolist()
            categories = ranked.categories[chosen].tolist()
            return ranking_pb2.RankResponse(
                items=[
                    ranking_pb2.RankedItem(item_id=ids[i], score=s, category=c)
                    for i, s, c in zip(chosen.tolist(), scores, categories, strict=True)
                ]
            )


class RankingService:
    name = RANKING
    grpc_services = (HEALTH_SERVICE_NAMES[RANKING],)

    def __init__(self, settings: RankingSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)

    def register(self, server: grpc.aio.Server) -> None:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(RankingServicer(self.settings), server)

    async def start(self) -> None:
        pass

    async def readiness(self) -> tuple[bool, str]:
        return True, "stateless"

    async def close(self) -> None:
        pass


def build() -> tuple[RankingService, RankingSettings]:
    settings = load_settings(RankingSettings, RANKING)
    return RankingService(settings), settings
