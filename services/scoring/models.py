"""One loaded model version: its sessions (instances), batcher, statistics and request checks.

Built in a loader thread (session creation and warmup are slow and release the GIL), then
activated on the event loop, where its batcher's workers live. A version takes traffic only
after every instance answered the configured warmup requests.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from services.genproto.inference import grpc_predict_v2_pb2 as pb

from services.scoring.drift import DriftMonitor
from services.runtime.errors import InvalidArgument
from services.runtime.logs import get_logger
from services.runtime.telemetry import ATTR_EXECUTION_PROVIDER, ATTR_MODEL_NAME, ATTR_MODEL_VERSION
from services.scoring.batcher import DynamicBatcher, Instance
from services.scoring.config import MODEL_FILE, ConfigError, ModelConfig, TensorSpec, WarmupSpec, read_provenance
from services.scoring.providers import (
    GPU_PROVIDERS,
    create_session,
    plan_providers,
    runner_for,
    tensorrt_libraries_present,
)
from services.scoring.stats import ScoringMetrics, Statistics, VersionMetrics
from services.scoring.tensors import BYTES, DTYPES, ORT_TYPES, from_contents, from_raw, to_onnx_input

log = get_logger(__name__)

PLATFORM = "onnxruntime_onnx"
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
_SHARED_MEMORY_PARAMETER = "shared_memory_region"


class ModelLoadError(Exception):
    """A version could not be loaded or warmed up; the message is the reason reported."""


@dataclass(frozen=True)
class LoadOptions:
    providers: str = "auto"
    intra_op_threads: int = 1


def memory_estimate(model_file_bytes: int, instances: int) -> int:
    """What a version is reckoned to hold in memory: its model file once per instance.

    The one estimate for ModelStatistics memory_usage (ModelVersion.byte_size) and the
    repository's memory budget, known before a load from the file's size. It leaves out
    ONNX Runtime's arenas and the batch buffers, which depend on traffic rather than the model.
    """
    return model_file_bytes * instances


@dataclass(frozen=True)
class Prepared:
    """A request's inputs checked against the model, ready for the batcher."""

    inputs: dict[str, np.ndarray]  # in the model's input order
    rows: int
    key: tuple[tuple[int, ...], ...]


def _ort_spec(node: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, ORT_TYPES.get(node.type, node.type), shape)


def _merge(kind: str, model: Sequence[TensorSpec], config: Sequence[TensorSpec], require_all: bool) -> tuple[TensorSpec, ...]:
    """The model file's tensors, narrowed by config.json where it says more; conflicts fail the load."""
    if not config:
        return tuple(model)
    by_name = {spec.name: spec for spec in model}
    unknown = [c.name for c in config if c.name not in by_name]
    if unknown:
        raise ConfigError(f"config {kind} {unknown} are not in the model, which has {sorted(by_name)}")
    if require_all and len(config) != len(model):
        missing = sorted(set(by_name) - {c.name for c in config})
        raise ConfigError(f"config {kind} leave out the model's {missing}")
    merged = []
    for wanted in config:
        actual = by_name[wanted.name]
        if wanted.datatype != actual.datatype:
            raise ConfigError(f"{kind[:-1]} {wanted.name!r}: config says {wanted.datatype}, the model takes {actual.datatype}")
        if len(wanted.shape) != len(actual.shape):
            raise ConfigError(f"{kind[:-1]} {wanted.name!r}: config shape {list(wanted.shape)} vs model {list(actual.shape)}")
        dims = []
        for c, m in zip(wanted.shape, actual.shape, strict=True):
            if c != -1 and m != -1 and c != m:
                raise ConfigError(f"{kind[:-1]} {wanted.name!r}: config shape {list(wanted.shape)} vs model {list(actual.shape)}")
            dims.append(m if c == -1 else c)
        merged.append(TensorSpec(wanted.name, wanted.datatype, tuple(dims)))
    return tuple(merged)


def warmup_shape(tensor: TensorSpec, batch_size: int) -> list[int]:
    """A warmup request's shape for `tensor`: variable dimensions run as 1, and the batch size
    fills a variable first dimension (ModelConfig reports the same)."""
    shape = [d if d >= 0 else 1 for d in tensor.shape]
    if shape and tensor.shape[0] == -1:
        shape[0] = batch_size
    return shape


def _warmup_inputs(inputs: Sequence[TensorSpec], spec: WarmupSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in inputs:
        shape = warmup_shape(tensor, spec.batch_size)
        if tensor.datatype == BYTES:
            arrays[tensor.name] = np.full(shape, "", dtype=object)
        elif spec.data == "random":
            arrays[tensor.name] = rng.random(shape).astype(DTYPES[tensor.datatype])
        else:
            arrays[tensor.name] = np.zeros(shape, DTYPES[tensor.datatype])
    return arrays


class ModelVersion:
    """A ready model version; request handling touches it only on the event loop."""

    def __init__(
        self,
        config: ModelConfig,
        version: int,
        path: Path,
        fingerprint: tuple[object, ...],
        instances: Sequence[Instance],
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        session_outputs: tuple[str, ...],
        provider: str,
        provider_reason: str,
        io_binding: bool,
        device_ids: tuple[int, ...],
        byte_size: int,
        provenance: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.number = version
        self.version = str(version)
        self.path = path
        self.fingerprint = fingerprint
        self.instances = tuple(instances)
        self.inputs = inputs
        self.outputs = outputs
        self.output_specs = {spec.name: spec for spec in outputs}
        self.output_order = tuple(spec.name for spec in outputs)
        self.session_outputs = session_outputs  # the order instances return outputs in
        self.provider = provider
        self.provider_reason = provider_reason
        self.io_binding = io_binding
        self.device_ids = device_ids
        self.byte_size = byte_size
        # Owner, training data digest, source revision...: config.json + provenance.json.
        self.provenance = dict(provenance if provenance is not None else config.provenance)
        self.stats = Statistics()
        self.state = LOADING
        self.batching = config.batching.max_batch_size > 0
        self.metrics: VersionMetrics | None = None
        self.drift: DriftMonitor | None = None
        self.batcher: DynamicBatcher | None = None
        self._input_specs = {spec.name: (index, spec) for index, spec in enumerate(inputs)}
        self._leases = 0
        self._idle: asyncio.Event | None = None
        # time.monotonic() of the last request that leased it (or of its activation): the
        # repository's memory budget unloads the least recently used models first.
        self.last_used = time.monotonic()

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def activate(self, metrics: ScoringMetrics | None) -> None:
        """Start the batcher's workers; call on the event loop."""
        self.metrics = metrics.bind(self.name, self.version) if metrics is not None else None
        self.batcher = DynamicBatcher(
            f"{self.name} v{self.version}",
            self.config.batching,
            self.instances,
            self.stats,
            self.metrics,
            span_attributes={
                ATTR_MODEL_NAME: self.name,
                ATTR_MODEL_VERSION: self.version,
                ATTR_EXECUTION_PROVIDER: self.provider,
            },
        )
        self.batcher.start()
        if self.metrics is not None:
            self.metrics.publish_info(self.provider, self.io_binding)
        # Input/prediction drift against the reference saved with the model (if it has one).
        self.drift = (
            DriftMonitor.for_model(
                self.path,
                metrics=metrics.registry if metrics is not None else None,
                model=self.name,
                version=self.version,
                sample_every=4,
            )
            if len(self.inputs) == 1
            else None
        )
        self.last_used = time.monotonic()
        self.state = READY

    # ------------------------------------------------------------------ leases

    @property
    def in_flight(self) -> int:
        """Requests that chose this version and are not answered yet."""
        return self._leases

    def acquire(self) -> None:
        self._leases += 1

    def release(self) -> None:
        self._leases -= 1
        if self._leases == 0 and self._idle is not None:
            self._idle.set()

    async def retire(self) -> None:
        """Wait for every request that already chose this version, then free it."""
        self.state = UNLOADING
        if self._leases:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self.batcher is not None:
            await self.batcher.close()
        if self.metrics is not None:
            self.metrics.retire(self.provider, self.io_binding)
        log.info("model version unloaded", model=self.name, version=self.version)

    # ------------------------------------------------------------------ requests

    def prepare(self, request: pb.ModelInferRequest) -> Prepared:
        """Decode and check every input against the model: INVALID_ARGUMENT on any mismatch."""
        raw = request.raw_input_contents
        tensors = request.inputs
        if raw and len(raw) != len(tensors):
            raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(tensors)} inputs; send one per input")
        if len(tensors) != len(self.inputs):
            raise InvalidArgument(
                f"model {self.name!r} expects {len(self.inputs)} inputs {[s.name for s in self.inputs]}, "
                f"got {len(tensors)} {[t.name for t in tensors]}"
            )
        arrays: list[np.ndarray | None] = [None] * len(self.inputs)
        for position, tensor in enumerate(tensors):
            found = self._input_specs.get(tensor.name)
            if found is None:
                raise InvalidArgument(
                    f"model {self.name!r} has no input {tensor.name!r}; it takes {[s.name for s in self.inputs]}"
                )
            index, spec = found
            if arrays[index] is not None:
                raise InvalidArgument(f"input {tensor.name!r} is given twice")
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(
                    f"input {tensor.name!r}: datatype {tensor.datatype} does not match the model's {spec.datatype}"
                )
            if _SHARED_MEMORY_PARAMETER in tensor.parameters:
                raise InvalidArgument(f"input {tensor.name!r}: shared memory is not supported; send the data")
            shape = tuple(tensor.shape)
            self._check_shape(spec, shape)
            if raw:
                array = from_raw(raw[position], spec.datatype, shape, spec.name)
            else:
                array = from_contents(tensor.contents, spec.datatype, shape, spec.name)
            arrays[index] = to_onnx_input(array, spec.datatype)
        inputs = {spec.name: array for spec, array in zip(self.inputs, arrays, strict=True)}
        if not self.batching:
            return Prepared(inputs, 1, ())
        rows = {a.shape[0] for a in inputs.values()}  # type: ignore[union-attr]
        if len(rows) != 1:
            raise InvalidArgument(f"inputs disagree on the batch size (first dimension): {sorted(rows)}")
        return Prepared(inputs, rows.pop(), tuple(a.shape[1:] for a in inputs.values()))  # type: ignore[union-attr]

    @staticmethod
    def _check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
        if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, shape, strict=True)):
            raise InvalidArgument(
                f"input {spec.name!r} has shape {list(shape)}; the model expects {list(spec.shape)} (-1 = any)"
            )

    async def infer(self, prepared: Prepared, deadline: float = math.inf, priority: int = 0) -> list[np.ndarray]:
        assert self.batcher is not None, "activate() first"
        outputs = await self.batcher.submit(prepared.inputs, prepared.rows, prepared.key, deadline, priority)
        if self.drift is not None:
            self.drift.observe(next(iter(prepared.inputs.values())), outputs[0])
        return outputs


# ---------------------------------------------------------------------- loading


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Instances have their own thread each; ORT's spinning pool would steal their cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def instance_device(config: ModelConfig, index: int) -> int:
    """The GPU instance `index` runs on when on a GPU: round robin over `gpus`, else device 0."""
    return config.gpus[index % len(config.gpus)] if config.gpus else 0


def build_version(
    model_dir: Path,
    version: int,
    config: ModelConfig,
    options: LoadOptions,
    fingerprint: tuple[object, ...],
) -> ModelVersion:
    """Create every instance's session and warm it up. Blocking: run it in a loader thread."""
    path = model_dir / str(version) / MODEL_FILE
    try:
        data = path.read_bytes()  # read once: instances share it and a later replace is harmless
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    try:
        provenance = read_provenance(path.parent, config.provenance)
    except ConfigError as error:
        raise ModelLoadError(str(error)) from None
    requested = config.execution_providers or (options.providers,)
    plan = plan_providers(requested, ort.get_available_providers(), tensorrt_libraries_present())
    threads = config.intra_op_threads or options.intra_op_threads
    instances: list[Instance] = []
    choices = []
    try:
        for index in range(config.instance_count):
            device_id = instance_device(config, index)
            try:
                choice = create_session(data, plan, session_options(threads), device_id)
            except Exception as error:
                raise ModelLoadError(f"{path}: onnxruntime cannot load it: {error}") from None
            choices.append((choice, device_id))
            instances.append(Instance(f"{index}", runner_for(choice, device_id)))
        first = choices[0][0].session
        inputs = _merge("inputs", [_ort_spec(i) for i in first.get_inputs()], config.inputs, require_all=True)
        outputs = _merge("outputs", [_ort_spec(o) for o in first.get_outputs()], config.outputs, require_all=False)
        if config.batching.max_batch_size:
            fixed = [s.name for s in (*inputs, *outputs) if not s.shape or s.shape[0] != -1]
            if fixed:
                raise ConfigError(f"max_batch_size > 0 needs a variable first (batch) dimension; {fixed} have none")
        _warm_up(config, inputs, instances)
    except Exception as error:
        for instance in instances:
            instance.close()
        expected = isinstance(error, (ConfigError, ModelLoadError))
        raise ModelLoadError(str(error) if expected else f"{type(error).__name__}: {error}") from None
    provider = choices[0][0].provider
    return ModelVersion(
        config=config,
        version=version,
        path=path,
        fingerprint=fingerprint,
        instances=instances,
        inputs=inputs,
        outputs=outputs,
        session_outputs=tuple(o.name for o in first.get_outputs()),
        provider=provider,
        provider_reason=choices[0][0].reason,
        io_binding=any(getattr(i.runner, "io_binding", False) for i in instances),
        device_ids=tuple(sorted({d for _, d in choices})) if provider in GPU_PROVIDERS else (),
        byte_size=memory_estimate(len(data), len(instances)),
        provenance=provenance,
    )


def _warm_up(config: ModelConfig, inputs: Sequence[TensorSpec], instances: Sequence[Instance]) -> None:
    for number, spec in enumerate(config.warmup):
        arrays = _warmup_inputs(inputs, spec, seed=number)
        for instance in instances:
            try:
                results = instance.runner(arrays)
            except Exception as error:
                raise ModelLoadError(f"warmup request {number} (batch {spec.batch_size}) failed: {error}") from None
            if config.batching.max_batch_size and any(r.shape[:1] != (spec.batch_size,) for r in results):
                raise ModelLoadError(
                    f"warmup request {number}: outputs {[r.shape for r in results]} lack the batch's "
                    f"{spec.batch_size} rows first"
                )
