"""gRPC adapter of the pipeline: GatewayService.Recommend (REST comes via Envoy's transcoder)."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from services.genproto.infermesh.features.v1 import features_pb2_grpc
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.genproto.infermesh.ranking.v1 import ranking_pb2_grpc

from gateway.budget import StageBudgets
from gateway.experiments import Experiments
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline, PipelineConfig, Stubs
from gateway.shadow import ShadowRunner
from services.runtime.channels import open_channel
from services.runtime.metrics import Metrics
from services.runtime.settings import ServerSettings, load_settings
from services.runtime.telemetry import current_trace_id
from services.runtime.topology import FEATURES, GATEWAY, HEALTH_SERVICE_NAMES, RANKING, SCORING


@dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    port: int = 30100
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
    # Per-stage shares of the request's deadline (weights, normalised over the stages a
    # request runs) and the share kept back for fallbacks and the response: gateway/budget.py.
    retrieval_budget: float = 0.15
    features_budget: float = 0.25
    scoring_budget: float = 0.35
    ranking_budget: float = 0.15
    fallback_reserve: float = 0.10
    # Send the item half of the feature rows to ranking, for its diversity (MMR) stage.
    send_item_embeddings: bool = True
    # Experiments (A/B arms, canary, shadow): one YAML/JSON file, see gateway/experiments.py.
    experiments_file: str = ""
    experiments_reload_seconds: float = 2.0
    # Shadow calls in flight at once when the file does not say (shadow.max_in_flight).
    shadow_max_in_flight: int = 8
    # The edge-facing service returns x-trace-id as initial metadata, which Envoy's
    # transcoder passes to REST clients as a header (see services/runtime/server.py).
    trace_id_metadata: str = "initial"

    def budgets(self) -> StageBudgets:
        return StageBudgets(
            retrieval=self.retrieval_budget,
            features=self.features_budget,
            scoring=self.scoring_budget,
            ranking=self.ranking_budget,
            reserve=self.fallback_reserve,
        )


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
            explain=request.explain,
            offset=request.offset,
        )
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
            degraded_reasons=result.degraded_reasons,
            experiment_arm=result.experiment_arm,
            explanations=result.explanations,
            total_items=result.total_items,
        )


class GatewayService:
    name = GATEWAY
    grpc_services = (HEALTH_SERVICE_NAMES[GATEWAY],)
    # Without these the gateway cannot answer at all; scoring and ranking have fallbacks,
    # so their outage degrades responses but leaves the gateway ready.
    required_backends = (FEATURES,)

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
        self.gateway_metrics = GatewayMetrics(self.metrics)
        self.experiments = Experiments(
            settings.experiments_file or None,
            settings.model_name,
            settings.shadow_max_in_flight,
            on_reload=lambda result: self.gateway_metrics.reloads.labels(result).inc(),
        )
        # One channel per backend for the life of the process, shared by every request,
        # the shadow calls and the readiness checks.
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
                budgets=settings.budgets(),
                send_item_embeddings=settings.send_item_embeddings,
            ),
            experiments=self.experiments,
            metrics=self.gateway_metrics,
            shadow=ShadowRunner(stubs.scoring, self.gateway_metrics),
        )
        self._health = {
            name: health_pb2_grpc.HealthStub(channel) for name, channel in self._channels.items()
        }
        self._watcher: asyncio.Task[None] | None = None
        self._sighup = False

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(self.pipeline), server)

    async def start(self) -> None:
        if self.experiments.path is None:
            return
        self._watcher = asyncio.create_task(self.experiments.watch(self.settings.experiments_reload_seconds))
        try:
            # SIGHUP reloads at once (the timer catches the change anyway).
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.experiments.check, True)
            self._sighup = True
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (in-process tests) or no signals on this platform

    async def readiness(self) -> tuple[bool, str]:
        """Ready when the required backends answer SERVING through their Envoy listeners;
        the others are reported but do not make the gateway unready."""

        async def check(name: str) -> str | None:
            try:
                reply = await self._health[name].Check(
                    health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[name]), timeout=1.0
                )
            except grpc.aio.AioRpcError as error:
                return f"{name}: {error.code().name}"
            return None if reply.status == health_pb2.HealthCheckResponse.SERVING else f"{name}: not serving"

        names = list(self._health)
        problems = dict(zip(names, await asyncio.gather(*(check(n) for n in names)), strict=True))
        blocking = [p for n, p in problems.items() if p and n in self.required_backends]
        degraded = [f"{p} (fallback)" for n, p in problems.items() if p and n not in self.required_backends]
        return (not blocking, "; ".join(blocking + degraded) or "all backends serving")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.pipeline.shadow.close()
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


def build() -> tuple[GatewayService, GatewaySettings]:
    settings = load_settings(GatewaySettings, GATEWAY)
    return GatewayService(settings), settings
