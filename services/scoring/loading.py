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

from services.runtime.limits import echo
from services.runtime.logs import get_logger
from services.scoring.batcher import INLINE_MAX_ROWS, Instance
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

log = get_logger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    providers: str = "auto"
    intra_op_threads: int = 1
    inline_batch_rows: int = INLINE_MAX_ROWS


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
    if config.warnings:
        log.warning(
            "model config says what this server does not do",
            model=config.name,
            version=version,
            warnings=config.warning_text(),
        )
    instances: list[Instance] = []  # closed again if the load fails part way
    try:
        data, provenance = _read_files(path, config)
        choices = _open_instances(data, path, config, options, instances)
        first = choices[0][0]
        inputs, outputs = _tensor_specs(config, first.session, f"{version}/{MODEL_FILE}")
        warm_up(config, inputs, instances)
    except Exception as error:
        for instance in instances:
            instance.close()
        expected = isinstance(error, (ConfigError, ModelLoadError))
        reason = str(error) if expected else f"{type(error).__name__}: {error}"
        # What the config asked for and was ignored may be why it failed: say it with it.
        raise ModelLoadError(f"{reason} ({config.warning_text()})" if config.warnings else reason) from None
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
        instances.append(Instance(f"{index}", runner_for(choice, device_id), inline_max_rows=options.inline_batch_rows))
    return choices


def _tensor_specs(
    config: ModelConfig, session: Any, model_file: str
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's inputs and outputs, narrowed by the config; ConfigError on a conflict,
    naming the config file, the field and what the model file (`model_file`) has."""
    model_inputs = [_ort_spec(i) for i in session.get_inputs()]
    model_outputs = [_ort_spec(o) for o in session.get_outputs()]
    inputs = _merge(config, "input", model_inputs, config.inputs, model_file, require_all=True)
    outputs = _merge(config, "output", model_outputs, config.outputs, model_file, require_all=False)
    if config.batching.max_batch_size:
        fixed = {s.name: list(s.shape) for s in (*inputs, *outputs) if not s.shape or s.shape[0] != -1}
        if fixed:
            raise ConfigError(
                f"{config.source.where('max_batch_size')}: {config.batching.max_batch_size} needs a variable first "
                f"(batch) dimension on every input and output; {model_file} has {fixed} (-1 = any size): "
                "set max_batch_size 0 and give whole shapes"
            )
    return inputs, outputs


def _ort_spec(node: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, ORT_TYPES.get(node.type, node.type), shape)


def _merge(
    config: ModelConfig,
    kind: str,
    model: Sequence[TensorSpec],
    stated: Sequence[TensorSpec],
    model_file: str,
    require_all: bool,
) -> tuple[TensorSpec, ...]:
    """The model file's tensors, narrowed by the config where it says more (a fixed size for
    a dynamic dimension); a name, data type or shape the model does not have fails the load."""
    if not stated:
        return tuple(model)
    by_name = {spec.name: spec for spec in model}
    has = ", ".join(f"{s.name!r} {s.datatype} {list(s.shape)}" for s in model)
    for wanted in stated:
        if wanted.name not in by_name:
            raise ConfigError(
                f"{config.source.where(wanted.field, 'name')}: the model has no {kind} {echo(wanted.name)}; "
                f"{model_file} has {has}"
            )
    missing = sorted(set(by_name) - {s.name for s in stated})
    if require_all and missing:
        stated_as = stated[0].field.partition("[")[0] or kind  # input (config.pbtxt) or inputs (config.json)
        raise ConfigError(
            f"{config.source.where(stated_as)}: leaves out the model's {kind}s {missing}; {model_file} has {has}"
        )
    return tuple(_narrowed(config, wanted, by_name[wanted.name], model_file) for wanted in stated)


def _narrowed(config: ModelConfig, wanted: TensorSpec, actual: TensorSpec, model_file: str) -> TensorSpec:
    """One stated tensor checked against the model's: same data type, same rank, each
    dimension equal where both fix it (-1 = any size); the config's fixed sizes win."""
    if wanted.datatype != actual.datatype:
        raise ConfigError(
            f"{config.source.where(wanted.field, 'data_type')}: {wanted.name!r} is {wanted.datatype} in the config, "
            f"but {model_file} expects {actual.datatype}"
        )
    if len(wanted.shape) != len(actual.shape) or any(
        c != -1 and m != -1 and c != m for c, m in zip(wanted.shape, actual.shape, strict=False)
    ):
        batch = " (the batch dimension first, as max_batch_size > 0)" if config.batching.max_batch_size else ""
        raise ConfigError(
            f"{config.source.where(wanted.field, 'dims')}: {wanted.name!r} has shape {list(wanted.shape)} in the "
            f"config{batch}, but {model_file} expects {list(actual.shape)} (-1 = any size)"
        )
    dims = tuple(m if c == -1 else c for c, m in zip(wanted.shape, actual.shape, strict=True))
    return TensorSpec(wanted.name, wanted.datatype, dims)
