"""One loaded model version: its instances, batcher, statistics, leases and request checks.

Built by loading.build_version in a loader thread, then activated on the event loop, where
its batcher's workers live. A version takes traffic only after every instance answered the
configured warmup requests (warmup.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.errors import InvalidArgument
from services.runtime.logs import get_logger
from services.runtime.telemetry import ATTR_EXECUTION_PROVIDER, ATTR_MODEL_NAME, ATTR_MODEL_VERSION
from services.scoring.batcher import DynamicBatcher, Instance
from services.scoring.config import PLATFORM as PLATFORM  # Triton's platform name, as ModelConfig states it
from services.scoring.config import ModelConfig, TensorSpec
from services.scoring.drift import DriftMonitor
from services.scoring.providers import GPU_PROVIDERS
from services.scoring.stats import ScoringMetrics, Statistics, VersionMetrics
from services.scoring.tensors import from_contents, from_raw, to_onnx_input

log = get_logger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
_SHARED_MEMORY_PARAMETER = "shared_memory_region"


class ModelLoadError(Exception):
    """A version could not be loaded or warmed up; the message is the reason reported."""


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
        # Input/prediction drift against the reference saved with the model (if it has one
        # that fits the model's inputs).
        self.drift = DriftMonitor.for_model(
            self.path,
            [(spec.name, spec.shape[1:]) for spec in self.inputs],
            metrics=metrics.registry if metrics is not None else None,
            model=self.name,
            version=self.version,
            sample_every=4,
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
        arrays: dict[int, np.ndarray] = {}  # by input index
        for position, tensor in enumerate(tensors):
            index, spec = self._input_spec(tensor.name)
            if index in arrays:
                raise InvalidArgument(f"input {tensor.name!r} is given twice")
            shape = self._checked_shape(spec, tensor)
            if raw:
                array = from_raw(raw[position], spec.datatype, shape, spec.name)
            else:
                array = from_contents(tensor.contents, spec.datatype, shape, spec.name)
            arrays[index] = to_onnx_input(array, spec.datatype)
        # As many tensors as inputs and none twice: every input is given. In the model's order.
        inputs = {spec.name: arrays[index] for index, spec in enumerate(self.inputs)}
        if not self.batching:
            return Prepared(inputs, 1, ())
        rows = {a.shape[0] for a in inputs.values()}
        if len(rows) != 1:
            raise InvalidArgument(f"inputs disagree on the batch size (first dimension): {sorted(rows)}")
        return Prepared(inputs, rows.pop(), tuple(a.shape[1:] for a in inputs.values()))

    def _input_spec(self, name: str) -> tuple[int, TensorSpec]:
        """The model input a request tensor names: its position and spec."""
        found = self._input_specs.get(name)
        if found is None:
            raise InvalidArgument(
                f"model {self.name!r} has no input {name!r}; it takes {[s.name for s in self.inputs]}"
            )
        return found

    @staticmethod
    def _checked_shape(spec: TensorSpec, tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
        """The tensor's shape, once its datatype, transport and shape match the model's input."""
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input {tensor.name!r}: datatype {tensor.datatype} does not match the model's {spec.datatype}"
            )
        if _SHARED_MEMORY_PARAMETER in tensor.parameters:
            raise InvalidArgument(f"input {tensor.name!r}: shared memory is not supported; send the data")
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, shape, strict=True)):
            raise InvalidArgument(
                f"input {spec.name!r} has shape {list(shape)}; the model expects {list(spec.shape)} (-1 = any)"
            )
        return shape

    async def infer(self, prepared: Prepared, deadline: float = math.inf, priority: int = 0) -> list[np.ndarray]:
        assert self.batcher is not None, "activate() first"
        outputs = await self.batcher.submit(prepared.inputs, prepared.rows, prepared.key, deadline, priority)
        if self.drift is not None:
            self.drift.observe(prepared.inputs, outputs[0])
        return outputs
