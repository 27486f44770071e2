"""gRPC adapter of the pipeline: GatewayService.Recommend (REST comes via Envoy's transcoder)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from infermesh.features.v1 import features_pb2_grpc
from infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from infermesh.ranking.v1 import ranking_pb2_grpc

from gateway.pipeline import Pipeline, PipelineConfig, Stubs
from services.common.channels import open_channel
from services.common.metrics import Metrics
from services.common.settings import ServerSettings, load_settings
from services.common.telemetry import current_trace_id, fallback_span
from services.mesh.topology import FEATURES, GATEWAY, HEALTH_SERVICE_NAMES, RANKING, SCORING


@dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    port: int = 50100
    # Each backend is reached through its Envoy listener, which load-balances the replicas.
    features_target: str = "127.0.0.1:9101"
    scoring_target: str = "127.0.0.1:9102"
    ranking_target: str = "127.0.0.1:9103"
    model_name: str = "ranker"
    default_k: int = 20
    max_k: int = 1000
    max_candidates: int = 1000
    max_per_category: int = 5
    timeout_seconds: float = 2.0
    # The edge-facing service returns x-trace-id as initial metadata, which Envoy's
    # transcoder passes to REST clients as a header (see services/common/server.py).
    trace_id_metadata: str = "initial"


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        result = await self._pipeline.recommend(
            request.user_id,
            list(request.candidate_ids),
            request.k if request.HasField("k") else None,
            context.time_remaining(),
            retrieve=request.retrieve_candidates,
        )
        if result.degraded:
            # Served from the feature service's cache/defaults: make it findable in the trace.
            with fallback_span("features", "feature store degraded: cached or default features"):
                pass
        return gateway_pb2.RecommendResponse(
            items=[
                gateway_pb2.RecommendedItem(item_id=i.item_id, score=i.score, category=i.category)
                for i in result.items
            ],
            model_name=result.model_name,
            model_version=result.model_version,
            trace_id=current_trace_id(),
            stage_timings=[
                gateway_pb2.StageTiming(stage=stage, milliseconds=ms) for stage, ms in result.stage_ms.items()
            ],
            unknown_items=result.unknown_items,
            degraded=result.degraded,
        )


class GatewayService:
    name = GATEWAY
    grpc_services = (HEALTH_SERVICE_NAMES[GATEWAY],)

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
        # One channel per backend for the life of the process.
        self._channels = {
            FEATURES: open_channel(settings.features_target),
            SCORING: open_channel(settings.scoring_target),
            RANKING: open_channel(settings.ranking_target),
        }
        stubs = Stubs(
            features=features_pb2_grpc.FeatureServiceStub(self._channels[FEATURES]),
            scoring=inference_pb2_grpc.GRPCInferenceServiceStub(self._channels[SCORING]),
            ranking=ranking_pb2_grpc.RankingServiceStub(self._channels[RANKING]),
        )
        self.pipeline = Pipeline(
            stubs,
            PipelineConfig(
                model_name=settings.model_name,
                default_k=settings.default_k,
                max_k=settings.max_k,
                max_candidates=settings.max_candidates,
                max_per_category=settings.max_per_category,
                default_timeout=settings.timeout_seconds,
            ),
        )
        self._health = {
            name: health_pb2_grpc.HealthStub(channel) for name, channel in self._channels.items()
        }

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(self.pipeline), server)

    async def start(self) -> None:
        pass

    async def readiness(self) -> tuple[bool, str]:
        """Ready when every backend answers SERVING through its Envoy listener."""

        async def check(name: str) -> str | None:
            try:
                reply = await self._health[name].Check(
                    health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[name]), timeout=1.0
                )
            except grpc.aio.AioRpcError as error:
                return f"{name}: {error.code().name}"
            return None if reply.status == health_pb2.HealthCheckResponse.SERVING else f"{name}: not serving"

        problems = [p for p in await asyncio.gather(*(check(n) for n in self._health)) if p]
        return (not problems, "; ".join(problems) or "all backends serving")

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


def build() -> tuple[GatewayService, GatewaySettings]:
    settings = load_settings(GatewaySettings, GATEWAY)
    return GatewayService(settings), settings
