"""Loading one model version: read its file, create a session per instance, check, warm up.

Blocking and CPU-heavy (session creation and warm-up release the GIL): the repository runs
build_version in its loader thread, then activates the version on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from services.scoring.batcher import Instance
from services.scoring.config import MODEL_FILE, ConfigError, ModelConfig, TensorSpec, read_provenance
from services.scoring.models import ModelLoadError, ModelVersion, memory_estimate
from services.scoring.providers import (
    GPU_PROVIDERS,
    SessionChoice,
    create_session,
    plan_providers,
    runner_for,
    tensorrt_libraries_present,
)
from services.scoring.tensors import ORT_TYPES
from services.scoring.warmup import warm_up


@dataclass(frozen=True)
class LoadOptions:
    providers: str = "auto"
    intra_op_threads: int = 1


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
    data, provenance = _read_files(path, config)
    instances: list[Instance] = []  # closed again if the load fails part way
    try:
        choices = _open_instances(data, path, config, options, instances)
        first = choices[0][0]
        inputs, outputs = _tensor_specs(config, first.session)
        warm_up(config, inputs, instances)
    except Exception as error:
        for instance in instances:
            instance.close()
        expected = isinstance(error, (ConfigError, ModelLoadError))
        raise ModelLoadError(str(error) if expected else f"{type(error).__name__}: {error}") from None
    return ModelVersion(
        config=config,
        version=version,
        path=path,
        fingerprint=fingerprint,
        instances=instances,
        inputs=inputs,
        outputs=outputs,
        session_outputs=tuple(o.name for o in first.session.get_outputs()),
        provider=first.provider,
        provider_reason=first.reason,
        io_binding=any(getattr(i.runner, "io_binding", False) for i in instances),
        device_ids=tuple(sorted({d for _, d in choices})) if first.provider in GPU_PROVIDERS else (),
        byte_size=memory_estimate(len(data), len(instances)),
        provenance=provenance,
    )


def _read_files(path: Path, config: ModelConfig) -> tuple[bytes, dict[str, str]]:
    """The model file's bytes and the version's provenance."""
    try:
        data = path.read_bytes()  # read once: instances share it and a later replace is harmless
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    try:
        provenance = read_provenance(path.parent, config.provenance)
    except ConfigError as error:
        raise ModelLoadError(str(error)) from None
    return data, provenance


def _open_instances(
    data: bytes, path: Path, config: ModelConfig, options: LoadOptions, instances: list[Instance]
) -> list[tuple[SessionChoice, int]]:
    """A session per instance, appended to `instances` as each opens; (choice, device) each."""
    requested = config.execution_providers or (options.providers,)
    plan = plan_providers(requested, ort.get_available_providers(), tensorrt_libraries_present())
    threads = config.intra_op_threads or options.intra_op_threads
    choices = []
    for index in range(config.instance_count):
        device_id = instance_device(config, index)
        try:
            choice = create_session(data, plan, session_options(threads), device_id)
        except Exception as error:
            raise ModelLoadError(f"{path}: onnxruntime cannot load it: {error}") from None
        choices.append((choice, device_id))
        instances.append(Instance(f"{index}", runner_for(choice, device_id)))
    return choices


def _tensor_specs(config: ModelConfig, session: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's inputs and outputs, narrowed by config.json; ConfigError on a conflict."""
    inputs = _merge("inputs", [_ort_spec(i) for i in session.get_inputs()], config.inputs, require_all=True)
    outputs = _merge("outputs", [_ort_spec(o) for o in session.get_outputs()], config.outputs, require_all=False)
    if config.batching.max_batch_size:
        fixed = [s.name for s in (*inputs, *outputs) if not s.shape or s.shape[0] != -1]
        if fixed:
            raise ConfigError(f"max_batch_size > 0 needs a variable first (batch) dimension; {fixed} have none")
    return inputs, outputs


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
