"""The pipeline file's models checked against the model repository, before anything serves.

A model's inputs are what its config says (config.json, or Triton's config.pbtxt, read as
the repository reads them) or, where the config names none, what the ONNX file of the
version the pipeline calls (the newest on disk by default) declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.runtime.pipeline import FeatureColumn, ModelInput, PipelineFile, check_model
from services.scoring.config import MODEL_FILE, ConfigError
from services.scoring.discovery import read_model_config, versions_on_disk

# ONNX's element types under Triton's datatype names (services/scoring/tensors.py).
_ONNX_DATATYPES = {"FLOAT": "FP32", "DOUBLE": "FP64", "FLOAT16": "FP16", "STRING": "BYTES"}


def model_inputs(directory: Path, version: str = "") -> tuple[list[ModelInput], str]:
    """The inputs of the model in `directory` and the file they were read from;
    ConfigError when neither its config nor a model file says."""
    config, _ = read_model_config(directory, None)
    if config.inputs:
        where = config.source.file or directory.name
        return [ModelInput(s.name, s.datatype, tuple(s.shape)) for s in config.inputs], where
    chosen = _chosen_version(directory, version)
    if chosen is None:
        raise ConfigError(f"{directory.name}: no {version or '<version>'}/{MODEL_FILE} to read the inputs from")
    return _onnx_inputs(directory / str(chosen) / MODEL_FILE), f"{directory.name}/{chosen}/{MODEL_FILE}"


def model_outputs(directory: Path, version: str = "") -> list[str]:
    """The output names of the model in `directory`: its config's, else the ONNX file's of
    the version the pipeline calls; empty when there is no file to read them from."""
    config, _ = read_model_config(directory, None)
    if config.outputs:
        return [spec.name for spec in config.outputs]
    chosen = _chosen_version(directory, version)
    if chosen is None:
        return []
    return [node.name for node in _onnx_graph(directory / str(chosen) / MODEL_FILE).output]


def _chosen_version(directory: Path, version: str) -> int | None:
    """The version the pipeline calls (`version`, else the newest on disk) if it is on disk."""
    on_disk = sorted(versions_on_disk(directory))
    chosen = int(version) if version.isdigit() else (on_disk[-1] if on_disk else None)
    return chosen if chosen in on_disk else None


def _onnx_graph(path: Path) -> Any:
    import onnx  # only here: the check reads the graph's declarations, not its weights

    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # noqa: BLE001 (whatever the parser raises, the file is at fault)
        raise ConfigError(f"{path.parent.parent.name}/{path.parent.name}/{path.name}: unreadable: {error}") from None


def _onnx_inputs(path: Path) -> list[ModelInput]:
    import onnx

    graph = _onnx_graph(path)
    weights = {w.name for w in graph.initializer}
    inputs = []
    for node in graph.input:
        if node.name in weights:
            continue
        tensor = node.type.tensor_type
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        inputs.append(ModelInput(node.name, _ONNX_DATATYPES.get(kind, kind), shape))
    return inputs


def check_models(
    pipeline: PipelineFile,
    repository: Path,
    views: Mapping[str, Mapping[str, FeatureColumn]] | None = None,
    require_all: bool = True,
) -> None:
    """Every pipeline model's inputs and output against the repository's (widths too when
    `views` are given); a model, or a pinned version, missing from the repository is an error
    unless `require_all` is false."""
    for index, model in enumerate(pipeline.spec.models):
        directory = repository / model.name
        if not directory.is_dir():
            if require_all:
                raise pipeline.error(
                    [(f"models[{index}].name", f"no model {model.name!r} in the model repository {repository}")]
                )
            continue
        if require_all and model.version and _chosen_version(directory, model.version) is None:
            found = ", ".join(map(str, sorted(versions_on_disk(directory)))) or "none"
            problem = f"{model.name} has no version {model.version} in {repository} (on disk: {found})"
            raise pipeline.error([(f"models[{index}].version", problem)])
        try:
            inputs, where = model_inputs(directory, model.version)
            outputs = model_outputs(directory, model.version)
        except ConfigError as error:
            raise pipeline.error([(f"models[{index}]", f"its inputs cannot be read: {error}")]) from None
        check_model(pipeline, index, inputs, where, views)
        if outputs and model.output not in outputs:
            problem = f"{model.name} has no output {model.output!r}; its outputs: {', '.join(outputs)}"
            raise pipeline.error([(f"models[{index}].output", problem)])
