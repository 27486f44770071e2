"""Open Inference Protocol (KServe v2 gRPC) servicer over the model repository.

Wire-compatible with tritonclient.grpc: Triton's model configuration, statistics and
repository extensions, its request parameters (priority, timeout in microseconds) and its
status codes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import cast

import grpc
import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.genproto.inference import model_config_pb2 as mc
from services.runtime.errors import (
    INTERNAL_ERROR_MESSAGE,
    DeadlineExceeded,
    InfermeshError,
    InvalidArgument,
    NotFound,
    Overloaded,
)
from services.runtime.logs import get_logger
from services.runtime.metrics import Metrics
from services.runtime.pipeline import pipeline_from_env
from services.runtime.redis_connection import RedisClientSettings, RedisTarget
from services.runtime.server import load_tls_settings
from services.runtime.settings import ServerSettings, SettingsError, listen_port, load_settings
from services.runtime.topology import HEALTH_SERVICE_NAMES, SCORING
from services.scoring.batcher import INLINE_MAX_ROWS, InferenceFailed
from services.scoring.cache import PredictionCache, cache_key
from services.scoring.config import BACKEND, MODEL_FILE, PLATFORM, BatchingPolicy, TensorSpec, VersionPolicy
from services.scoring.loading import LoadOptions, instance_device
from services.scoring.models import ModelVersion
from services.scoring.pipeline_models import check_models
from services.scoring.providers import ProviderAlias
from services.scoring.repository import ControlMode, ModelRepository, RepositoryOptions
from services.scoring.rest.server import InferenceHttpServer, server_ssl_context
from services.scoring.stats import ScoringMetrics, register_gpu_memory
from services.scoring.tensors import BYTES, DTYPES, to_raw
from services.scoring.warmup import warmup_shape

log = get_logger(__name__)

SERVER_NAME = "infermesh"
EXTENSIONS = [
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
    "parameters",
    "schedule_policy",
]
# Requests of one ModelStreamInfer stream in flight at once (reading pauses beyond).
STREAM_IN_FLIGHT = 256
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# Trailing metadata on ModelMetadata: the execution provider a version runs on, and why.
PROVIDER_KEY = "infermesh-execution-provider"
PROVIDER_REASON_KEY = "infermesh-execution-provider-reason"
# OIP datatype -> Triton's DataType enum; Triton calls BYTES TYPE_STRING. (The stubs type
# Value() as a plain int, the enum's members as DataType: the same ints at run time.)
TRITON_DATA_TYPES: Mapping[str, mc.DataType] = {
    **{datatype: cast("mc.DataType", mc.DataType.Value(f"TYPE_{datatype}")) for datatype in DTYPES},
    BYTES: mc.TYPE_STRING,
}


class ScoringSettings(ServerSettings, RedisClientSettings):
    """Scoring: the Open Inference Protocol server over the ONNX model repository."""

    model_config = SettingsConfigDict(env_prefix=f"{SCORING.upper()}_")

    port: int = listen_port(30300)
    http_port: int = Field(
        0,
        ge=0,
        le=65535,
        description=(
            "Port of the Open Inference Protocol over HTTP/REST (GET /v2/health/ready, "
            "POST /v2/models/<name>/infer, ...), served beside gRPC; 0 turns it off."
        ),
    )
    model_repository: str = Field(
        ".infermesh/models",
        min_length=1,
        description="The model repository: `<model>/config.json` and `<model>/<version>/model.onnx`.",
    )
    providers: ProviderAlias = Field(
        "auto",
        description=(
            "Execution providers: auto (TensorRT, then CUDA, then CPU, as far as this host has them), "
            "tensorrt, cuda or cpu. A model's config.json execution_providers overrides it."
        ),
    )
    intra_op_threads: int = Field(
        1,
        ge=0,
        description=(
            "ONNX Runtime threads per inference session, unless a model's config sets its own; "
            "0: ONNX Runtime's default."
        ),
    )
    inline_batch_rows: int = Field(
        INLINE_MAX_ROWS,
        ge=0,
        description=(
            "A batch of at most this many rows, that its model's recent speed puts under 1 ms, runs on the "
            "event loop's thread instead of its instance's (two thread wake-ups fewer per call); 0: never. "
            "Set 0 for a model that may hang: inline, it would hang the replica's health checks too."
        ),
    )
    model_control_mode: ControlMode = Field(
        "poll",
        description=(
            "poll: load everything at start, then pick up new or changed versions in the background; "
            "explicit: load_models at start, then only RepositoryModelLoad/Unload; none: load everything once."
        ),
    )
    repository_poll_seconds: float = Field(2.0, gt=0, description="poll mode: how often the repository is re-read.")
    load_models: str = Field(
        "", description='explicit mode: models loaded at start, comma-separated; "*": all of them.'
    )
    cache_redis_url: str = Field(
        "",
        description=(
            "Redis for the models that enable response_cache, opened with SCORING_REDIS_USERNAME, "
            "_PASSWORD and _TLS_*; empty: no response cache anywhere."
        ),
    )
    cache_timeout_seconds: float = Field(
        0.1, gt=0, description="Longest a response-cache read or write waits on Redis."
    )
    cache_retry_seconds: float = Field(
        5.0, ge=0, description="After a Redis failure the response cache is off this long, then tried again."
    )
    model_memory_budget_bytes: int = Field(
        0,
        ge=0,
        description=(
            "Bytes of loaded model versions (each: its model file once per instance); past it, the least "
            "recently used other models are unloaded to make room. 0: no budget."
        ),
    )

    def cache_redis(self) -> RedisTarget | None:
        """The response cache's Redis, None without one; SettingsError when the credentials clash."""
        return self.redis_target(self.cache_redis_url, "cache_redis_url") if self.cache_redis_url else None


def _parameter(parameter: pb.InferParameter) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


def _int_parameter(request: pb.ModelInferRequest, name: str) -> int:
    if name not in request.parameters:
        return 0
    value = _parameter(request.parameters[name])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"request parameter {name!r} must be a non-negative integer, got {value!r}")
    return value


def _schedule(
    request: pb.ModelInferRequest, context: grpc.aio.ServicerContext, policy: BatchingPolicy
) -> tuple[float, int]:
    """(deadline on the loop clock, priority) from the gRPC deadline and Triton's parameters."""
    now = asyncio.get_running_loop().time()
    deadline = math.inf
    remaining = context.time_remaining()
    if remaining is not None:
        deadline = now + remaining
    timeout_us = _int_parameter(request, "timeout") or policy.default_timeout_microseconds
    if timeout_us:
        deadline = min(deadline, now + timeout_us / 1e6)
    return deadline, _int_parameter(request, "priority")


def _requested_outputs(model: ModelVersion, request: pb.ModelInferRequest) -> list[str]:
    """Checked before inference, so a bad output name costs no model execution."""
    for requested in request.outputs:
        if "classification" in requested.parameters:
            raise InvalidArgument(f"output {requested.name!r}: classification is not supported; ask for the tensor")
        if requested.name not in model.output_specs:
            raise InvalidArgument(
                f"model {model.name!r} has no output {requested.name!r}; it has {list(model.output_order)}"
            )
    return [o.name for o in request.outputs] or list(model.output_order)


def _encode(
    model: ModelVersion, request: pb.ModelInferRequest, outputs: list[np.ndarray], wanted: list[str]
) -> pb.ModelInferResponse:
    produced = dict(zip(model.session_outputs, outputs, strict=True))
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    for name in wanted:
        array = produced[name]
        datatype = model.output_specs[name].datatype
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(to_raw(array, datatype))
    return response


def _failure_reason(error: BaseException) -> str:
    """Triton's reason label (stats.FAILURE_REASONS): REJECTED for what its scheduler turns
    away (a full queue, a deadline that ran out waiting), BACKEND for a failed execution,
    OTHER for the rest (bad input among them)."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELED"
    if isinstance(error, (Overloaded, DeadlineExceeded)):
        return "REJECTED"
    if isinstance(error, InferenceFailed):
        return "BACKEND"
    return "OTHER"


def _ascii(text: str) -> str:
    """gRPC metadata values must be printable ASCII."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:1000]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, cache: PredictionCache | None = None) -> None:
        self._repository = repository
        self._cache = cache

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._repository.readiness()[0])

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        try:
            self._repository.resolve(request.name, request.version)
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=metadata.version("infermesh"), extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        versions = self._repository.versions(request.name, request.version)
        model = versions[-1]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        # Appended: the server's interceptor may already have set some (the trace id).
        context.set_trailing_metadata(
            (
                *(context.trailing_metadata() or ()),
                (PROVIDER_KEY, model.provider),
                (PROVIDER_REASON_KEY, _ascii(model.provider_reason)),
            )
        )
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[v.version for v in versions],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs],
            provenance=model.provenance,
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        # The version is resolved as ModelMetadata does: the newest ready one unless named.
        model = self._repository.versions(request.name, request.version)[-1]
        return pb.ModelConfigResponse(config=triton_model_config(model))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        with self._repository.lease(request.model_name, request.model_version) as model:
            started = time.perf_counter_ns()
            try:
                response = await self._infer(model, request, context)
            except (Exception, asyncio.CancelledError) as error:
                model.stats.fail.add(time.perf_counter_ns() - started)
                if model.metrics is not None:
                    model.metrics.failure(_failure_reason(error)).inc()
                raise
            elapsed = time.perf_counter_ns() - started
            model.stats.success.add(elapsed)
            if model.metrics is not None:
                model.metrics.success.inc()
                model.metrics.request_us.inc(elapsed / 1000)
            return response

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming extension. Each request is scheduled as it arrives (so the
        batcher merges a stream's requests like concurrent calls) and answered when its
        inference is done, in completion order; one that fails is answered with
        error_message (its id and model in infer_response) and the stream goes on. At most
        STREAM_IN_FLIGHT requests of a stream are read and not yet answered on the wire:
        beyond that the server stops reading and HTTP/2 flow control holds the client back
        (also one that sends without reading its answers)."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def answer(request: pb.ModelInferRequest) -> None:
            answers.put_nowait(await self._stream_answer(request, context))

        async def read() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    async for request in requests:
                        await slots.acquire()
                        group.create_task(answer(request))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
                slots.release()
            await reader  # the stream ended by an error reading it: raise that
        finally:
            reader.cancel()

    async def _stream_answer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, context))
        except InfermeshError as error:
            message = str(error)
        except Exception:
            log.exception("unhandled error", grpc_method=STREAM_METHOD, model=request.model_name)
            message = INTERNAL_ERROR_MESSAGE
        failed = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)

    async def _infer(
        self, model: ModelVersion, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        prepared = model.prepare(request)
        wanted = _requested_outputs(model, request)
        deadline, priority = _schedule(request, context, model.config.batching)
        cache = self._cache if model.config.cache.enable else None
        key = ""
        if cache is not None:
            looked_up = time.perf_counter_ns()
            key = cache_key(model.name, model.version, request)
            hit = await cache.get(key)
            lookup_ns = time.perf_counter_ns() - looked_up
            if hit is not None:
                model.stats.cache_hit.add(lookup_ns)
                if model.metrics is not None:
                    model.metrics.cache_hits.inc()
                    model.metrics.cache_hit_us.inc(lookup_ns / 1000)
                hit.id = request.id
                return hit
            model.stats.cache_miss.add(lookup_ns)
            if model.metrics is not None:
                model.metrics.cache_misses.inc()
                model.metrics.cache_miss_us.inc(lookup_ns / 1000)
        outputs = await model.infer(prepared, deadline, priority)
        response = _encode(model, request, outputs, wanted)
        if cache is not None:
            cache.put(key, response, model.config.cache.ttl_seconds)
        return response

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        for model in self._repository.versions(request.name, request.version):
            s = model.stats
            response.model_stats.add(
                name=model.name,
                version=model.version,
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=s.inference_stats(),
                batch_stats=s.batch_stats(),
                memory_usage=_memory_usage(model),
            )
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for row in self._repository.index(ready_only=request.ready):
            response.models.add(name=row.name, version=row.version, state=row.state, reason=row.reason)
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        override = None
        for key, parameter in request.parameters.items():
            if key == "config":
                override = parameter.string_param
            elif key.startswith("file:"):
                raise InvalidArgument(
                    "loading model files sent in the request is not supported; put them in the repository"
                )
        await self._repository.load(request.model_name, override)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def triton_model_config(model: ModelVersion) -> mc.ModelConfig:
    """A served version's configuration in Triton's model_config.proto layout.

    From the version's parsed config.json and what the model file filled in (tensor names,
    types, shapes). As in Triton, dims leave out the batch dimension when max_batch_size > 0
    (config.json's shapes include it).
    """
    config = model.config
    return mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=_version_policy(config.version_policy),
        max_batch_size=config.batching.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=_data_type(s), dims=_dims(s.shape, model.batching))
            for s in model.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=_data_type(s), dims=_dims(s.shape, model.batching))
            for s in model.outputs
        ],
        instance_group=_instance_groups(model),
        default_model_filename=MODEL_FILE,
        dynamic_batching=_dynamic_batching(config.batching) if model.batching else None,
        parameters={key: mc.ModelParameter(string_value=value) for key, value in model.provenance.items()},
        model_warmup=_warmups(model),
        response_cache=mc.ModelResponseCache(enable=True) if config.cache.enable else None,
    )


def _data_type(spec: TensorSpec) -> mc.DataType:
    return TRITON_DATA_TYPES.get(spec.datatype, mc.TYPE_INVALID)


def _dims(shape: Sequence[int], batching: bool) -> list[int]:
    return list(shape[1:] if batching else shape)


def _version_policy(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    if policy.kind == "all":
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.kind == "specific":
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=policy.versions))
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=policy.num_versions))


def _dynamic_batching(policy: BatchingPolicy) -> mc.ModelDynamicBatching:
    return mc.ModelDynamicBatching(
        preferred_batch_size=policy.preferred_batch_sizes,
        max_queue_delay_microseconds=policy.max_queue_delay_microseconds,
        priority_levels=policy.priority_levels,
        default_priority_level=policy.default_priority_level,
        default_queue_policy=mc.ModelQueuePolicy(
            default_timeout_microseconds=policy.default_timeout_microseconds, max_queue_size=policy.max_queue_size
        ),
    )


def _instance_groups(model: ModelVersion) -> list[mc.ModelInstanceGroup]:
    """Where the version's instances run. Triton's count is per listed GPU, so GPUs with the
    same number of instances share a group."""
    config = model.config
    if not model.on_gpu:
        return [
            mc.ModelInstanceGroup(
                name=f"{model.name}_0", kind=mc.ModelInstanceGroup.KIND_CPU, count=config.instance_count
            )
        ]
    per_device = Counter(instance_device(config, i) for i in range(config.instance_count))
    devices_by_count: dict[int, list[int]] = {}
    for device, count in sorted(per_device.items()):
        devices_by_count.setdefault(count, []).append(device)
    return [
        mc.ModelInstanceGroup(
            name=f"{model.name}_{number}", kind=mc.ModelInstanceGroup.KIND_GPU, count=count, gpus=devices
        )
        for number, (count, devices) in enumerate(sorted(devices_by_count.items(), reverse=True))
    ]


def _warmups(model: ModelVersion) -> list[mc.ModelWarmup]:
    """The warmup requests the version ran at load (warmup.warmup_shape); without batching
    Triton's batch_size is 1 and the dims are the whole shape."""
    warmups = []
    for number, spec in enumerate(model.config.warmup):
        inputs = {}
        for tensor in model.inputs:
            shape = warmup_shape(tensor, spec.batch_size)
            inputs[tensor.name] = warmup_input = mc.ModelWarmup.Input(
                data_type=_data_type(tensor), dims=_dims(shape, model.batching)
            )
            # One field of the input_data_type oneof, set as the constructor would.
            if spec.data == "random":
                warmup_input.random_data = True
            else:
                warmup_input.zero_data = True
        batch_size = spec.batch_size if model.batching else 1
        warmups.append(mc.ModelWarmup(name=f"warmup_{number}", batch_size=batch_size, inputs=inputs))
    return warmups


def _memory_usage(model: ModelVersion) -> list[pb.MemoryUsage]:
    """Where the version lives: GPU ids or CPU; byte_size is the model file times instances."""
    if not model.device_ids:
        return [pb.MemoryUsage(type="CPU", id=0, byte_size=model.byte_size)]
    share = model.byte_size // len(model.device_ids)
    return [pb.MemoryUsage(type="GPU", id=device, byte_size=share) for device in model.device_ids]


class ScoringService:
    name = SCORING
    grpc_services: tuple[str, ...] = (HEALTH_SERVICE_NAMES[SCORING],)

    def __init__(self, settings: ScoringSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(self.name)
        self.scoring_metrics = ScoringMetrics(self.metrics)
        startup = tuple(n.strip() for n in settings.load_models.split(",") if n.strip())
        self.repository = ModelRepository(
            Path(settings.model_repository),
            RepositoryOptions(
                mode=settings.model_control_mode,
                poll_seconds=settings.repository_poll_seconds,
                startup_models=startup,
                load=LoadOptions(settings.providers, settings.intra_op_threads, settings.inline_batch_rows),
                memory_budget_bytes=settings.model_memory_budget_bytes,
            ),
            self.scoring_metrics,
        )
        cache_redis = settings.cache_redis()
        self.cache = (
            PredictionCache(
                cache_redis, settings.cache_timeout_seconds, settings.cache_retry_seconds, self.scoring_metrics
            )
            if cache_redis is not None
            else None
        )
        # Set once the models of the initial load are ready (or failed): for embedders and tests.
        self.started = asyncio.Event()
        self.gpu_memory_metrics = register_gpu_memory(self.metrics.registry)

        # One servicer for both protocols: gRPC, and HTTP/REST through its adapter.
        self.servicer = InferenceServicer(self.repository, self.cache)
        self.http: InferenceHttpServer | None = None

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        # HTTP before the models load, like gRPC: its health endpoints answer meanwhile.
        if self.settings.http_port:
            await self._start_http()
        await self.repository.start()
        if self.cache is None:
            wanting = [name for name, model in self.repository.loaded.items() if model.config.cache.enable]
            if wanting:
                log.warning("models enable response_cache but SCORING_CACHE_REDIS_URL is empty", models=wanting)
        self.started.set()

    async def readiness(self) -> tuple[bool, str]:
        return self.repository.readiness()

    async def _start_http(self) -> None:
        settings = self.settings
        try:
            ssl_context = server_ssl_context(load_tls_settings(self.name))
        except (SettingsError, OSError) as error:
            raise SystemExit(f"{self.name}: HTTP server TLS: {error}") from None
        self.http = InferenceHttpServer(
            self.servicer,
            host=settings.host,
            port=settings.http_port,
            max_body_bytes=settings.max_message_bytes,
            ssl_context=ssl_context,
            grace_seconds=settings.grace_seconds,
        )
        try:
            await self.http.start()
        except OSError as error:
            address = self.http.address
            raise SystemExit(f"{self.name}: cannot serve HTTP on {address} ({error}); is the port in use?") from None

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        await self.repository.close()
        if self.cache is not None:
            await self.cache.close()


def build() -> tuple[ScoringService, ScoringSettings]:
    settings = load_settings(ScoringSettings)
    # The pipeline's models that this repository holds: their inputs' names and datatypes
    # checked before the server exists (the widths need the views: `infermesh up` checks them).
    check_models(pipeline_from_env(), Path(settings.model_repository), require_all=False)
    cache_redis = settings.cache_redis()
    if cache_redis is not None:
        # Refused credentials stop the service here, in one line naming the variable; an
        # unreachable Redis does not (the cache turns itself off and retries).
        cache_redis.check()
    return ScoringService(settings), settings
