"""gRPC adapter of the pipeline: GatewayService.Recommend (REST comes via Envoy's transcoder)."""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.budget import DEFAULT_DEADLINE_SECONDS, BudgetWeight, ReserveShare, StageBudgets
from gateway.caller import record_caller
from gateway.experiments import Experiments
from gateway.limits import RequestLimits, check_recommend
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline, PipelineConfig, Stubs
from gateway.shadow import ShadowRunner
from gateway.stage_calls import CoalescedCalls, DirectCalls, StageCalls
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from services.genproto.infermesh.features.v1 import features_pb2_grpc
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.genproto.infermesh.ranking.v1 import ranking_pb2_grpc
from services.runtime.channels import open_channel
from services.runtime.limits import DEFAULT_MAX_ID_LENGTH
from services.runtime.metrics import Metrics
from services.runtime.pipeline import ModelSpec, PipelineFile, load_pipeline, pipeline_from_env
from services.runtime.settings import ServerSettings, TraceIdMetadata, listen_port, load_settings
from services.runtime.telemetry import current_trace_id
from services.runtime.topology import FEATURES, GATEWAY, HEALTH_SERVICE_NAMES, RANKING, SCORING

DEFAULT_BUDGETS = StageBudgets()


class GatewaySettings(ServerSettings):
    """The gateway: the Recommend pipeline over features, scoring and ranking."""

    model_config = SettingsConfigDict(env_prefix=f"{GATEWAY.upper()}_")

    port: int = listen_port(30100)
    # Each backend is reached through its Envoy listener, which load-balances the replicas.
    features_target: str = Field(
        "127.0.0.1:9101", min_length=1, description="host:port of the features service (its Envoy listener)."
    )
    scoring_target: str = Field(
        "127.0.0.1:9102", min_length=1, description="host:port of the scoring service (its Envoy listener)."
    )
    ranking_target: str = Field(
        "127.0.0.1:9103", min_length=1, description="host:port of the ranking service (its Envoy listener)."
    )
    model_name: str = Field(
        "ranker",
        min_length=1,
        description=(
            "Model scored when no experiment arm names another; set, it wins over the pipeline file's "
            "first model (INFERMESH_PIPELINE), whose name is used otherwise."
        ),
    )
    default_k: int = Field(20, ge=1, description="Items returned when a request sets no k.")
    max_k: int = Field(1000, ge=1, description="Largest k a request may ask for.")
    max_candidates: int = Field(
        1000, ge=1, description="Most candidate_ids a request may bring, and most it may ask retrieval for."
    )
    max_per_category: int = Field(
        5,
        ge=0,
        description="At most this many items of one category in a response (ranking's category_cap); 0: no cap.",
    )
    max_id_length: int = Field(
        DEFAULT_MAX_ID_LENGTH, ge=1, description="Longest user_id or candidate id a request may carry, in characters."
    )
    timeout_seconds: float = Field(
        DEFAULT_DEADLINE_SECONDS,
        gt=0,
        description=(
            "Whole-request budget when the caller sets no gRPC deadline. Through the edge every "
            "request has one: Envoy gives callers that set none its default (docs/envoy.md)."
        ),
    )
    # Weights normalised over the stages a request runs, and the share of the whole
    # deadline kept back for fallbacks and the response: gateway/budget.py.
    retrieval_budget: BudgetWeight = Field(
        DEFAULT_BUDGETS.retrieval,
        description="Weight of candidate retrieval in the deadline (only when a request brings no candidates).",
    )
    features_budget: BudgetWeight = Field(
        DEFAULT_BUDGETS.features, description="Weight of GetFeatures in the deadline."
    )
    scoring_budget: BudgetWeight = Field(DEFAULT_BUDGETS.scoring, description="Weight of ModelInfer in the deadline.")
    ranking_budget: BudgetWeight = Field(DEFAULT_BUDGETS.ranking, description="Weight of Rank in the deadline.")
    fallback_reserve: ReserveShare = Field(
        DEFAULT_BUDGETS.reserve,
        description="Share of the whole deadline kept back for the fallbacks and writing the response.",
    )
    send_item_embeddings: bool = Field(
        True,
        description=(
            "Send the item half of the feature rows to ranking, for its diversity (MMR) stage, while ranking says "
            "its chain reads them (RankResponse.item_embeddings_unused); false: never."
        ),
    )
    experiments_file: str = Field(
        "", description="YAML/JSON file of A/B arms, canary and shadow (docs/gateway.md); empty: no experiments."
    )
    experiments_reload_seconds: float = Field(
        2.0, gt=0, description="How often the experiments file is checked for changes (SIGHUP reloads at once)."
    )
    shadow_max_in_flight: int = Field(
        8,
        ge=1,
        description=(
            "Batched shadow calls in flight at once when the experiments file does not say; while they "
            "run, up to 64 copies wait for the next batch and further ones are dropped (and counted)."
        ),
    )
    coalesce: bool = Field(
        True,
        description=(
            "Coalesce concurrent requests' calls to each stage into one call (GetFeaturesBatch, one "
            "ModelInfer over their rows, RankBatch) while a call to that stage is in flight; an idle "
            "stage is called at once, alone."
        ),
    )
    coalesce_max_batch: int = Field(
        32, ge=1, le=64, description="Most requests in one coalesced call (the backends accept at most 64)."
    )
    coalesce_max_in_flight: int = Field(
        1,
        ge=1,
        description=(
            "Calls in flight per stage before further requests queue to be coalesced. 1 gives the "
            "biggest batches and the least CPU per request (docs/benchmarks.md); more lets several "
            "replicas of a stage work at once."
        ),
    )
    coalesce_max_wait_ms: float = Field(
        50.0,
        gt=0,
        description=(
            "A stage that sent no call for this long while requests queue (a call stuck on a hung "
            "dependency) gets the queue as a new call at once, beyond the in-flight limit."
        ),
    )
    coalesce_max_rows: int = Field(
        4096,
        ge=1,
        description=(
            "Most feature rows in one coalesced scoring call: at most the model's max_batch_size. A "
            "batch the model refuses is sent again request by request."
        ),
    )
    trace_id_metadata: TraceIdMetadata = Field(
        "rest",
        description=(
            "How each response returns its trace id (x-trace-id): rest sends it as initial "
            "metadata to REST calls (Envoy's transcoder passes it to the client as a header) and "
            "as trailing metadata to gRPC calls, which spares them one write; initial (every "
            "call), trailing, or none."
        ),
    )

    @model_validator(mode="after")
    def _default_k_is_allowed(self) -> GatewaySettings:
        if self.default_k > self.max_k:
            raise ValueError(
                f"{self.variable('default_k')}={self.default_k} is above {self.variable('max_k')}={self.max_k}: "
                "requests without k would all be refused"
            )
        return self

    def budgets(self) -> StageBudgets:
        return StageBudgets(
            retrieval=self.retrieval_budget,
            features=self.features_budget,
            scoring=self.scoring_budget,
            ranking=self.ranking_budget,
            reserve=self.fallback_reserve,
        )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, pipeline: Pipeline, limits: RequestLimits | None = None) -> None:
        self._pipeline = pipeline
        self._limits = limits or RequestLimits()

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        record_caller(context)  # who the edge says called: on the span and the log lines
        candidate_ids = check_recommend(request, self._limits)  # before any work: gateway/limits.py
        result = await self._pipeline.recommend(
            request.user_id,
            candidate_ids,
            request.k if request.HasField("k") else None,
            context.time_remaining(),
            retrieve=request.retrieve_candidates,
            explain=request.explain,
            offset=request.offset,
        )
        return gateway_pb2.RecommendResponse(
            items=[
                gateway_pb2.RecommendedItem(item_id=i.item_id, score=i.score, category=i.category) for i in result.items
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
    grpc_services: tuple[str, ...] = (HEALTH_SERVICE_NAMES[GATEWAY],)
    # Without these the gateway cannot answer at all; scoring and ranking have fallbacks,
    # so their outage degrades responses but leaves the gateway ready.
    required_backends = (FEATURES,)

    def __init__(self, settings: GatewaySettings, pipeline: PipelineFile | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
        self.gateway_metrics = GatewayMetrics(self.metrics)
        pipeline = pipeline or load_pipeline()
        model, fallback = scored_model(settings, pipeline), pipeline.spec.fallback
        self.experiments = Experiments(
            settings.experiments_file or None,
            model.name,
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
                model_name=model.name,
                model_input=model.inputs[0].name,
                model_output=model.output,
                default_k=settings.default_k,
                max_k=settings.max_k,
                max_candidates=settings.max_candidates,
                max_per_category=settings.max_per_category,
                default_timeout=settings.timeout_seconds,
                budgets=settings.budgets(),
                send_item_embeddings=settings.send_item_embeddings,
                fallback_scores=fallback.scores,
                neutral_score=fallback.neutral_score,
                fallback_model_name=fallback.model_name,
            ),
            experiments=self.experiments,
            metrics=self.gateway_metrics,
            shadow=ShadowRunner(stubs.scoring, self.gateway_metrics, max_batch_rows=settings.coalesce_max_rows),
            calls=self._stage_calls(stubs),
        )
        self._health = {name: health_pb2_grpc.HealthStub(channel) for name, channel in self._channels.items()}
        self._watcher: asyncio.Task[None] | None = None
        self._sighup = False

    def _stage_calls(self, stubs: Stubs) -> StageCalls:
        if not self.settings.coalesce:
            return DirectCalls(stubs)
        return CoalescedCalls(
            stubs,
            max_batch=self.settings.coalesce_max_batch,
            max_in_flight=self.settings.coalesce_max_in_flight,
            max_rows=self.settings.coalesce_max_rows,
            max_wait=self.settings.coalesce_max_wait_ms / 1000.0,
            observe_batch=self.gateway_metrics.observe_batch,
        )

    def register(self, server: grpc.aio.Server) -> None:
        limits = RequestLimits(self.settings.max_id_length, self.settings.max_candidates, self.settings.max_k)
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(self.pipeline, limits), server)

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


def scored_model(settings: GatewaySettings, pipeline: PipelineFile) -> ModelSpec:
    """The pipeline's first model, named GATEWAY_MODEL_NAME instead where that is set. Its
    inputs come built from features (one tensor per named input), so any number will do."""
    model = pipeline.spec.model
    if "model_name" in settings.model_fields_set:
        return model.model_copy(update={"name": settings.model_name})
    return model


def build() -> tuple[GatewayService, GatewaySettings]:
    settings = load_settings(GatewaySettings)
    return GatewayService(settings, pipeline_from_env()), settings
