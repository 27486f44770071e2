"""The pipeline file's views: the registry it names, and its columns checked against it."""

from __future__ import annotations

from services.features.model_inputs import RequestLayout, request_layout
from services.features.registry import Registry, RegistryError, load_registry, parse_registry
from services.runtime.pipeline import FeatureColumn, PipelineFile, check_views


def pipeline_registry(pipeline: PipelineFile, override: str = "") -> Registry:
    """The views the pipeline declares (FEATURES_REGISTRY, `override`, wins when set);
    PipelineError naming the pipeline file when they cannot be read."""
    source = override or pipeline.registry_source()
    try:
        if isinstance(source, dict):
            return parse_registry(source)
        return load_registry(source)
    except RegistryError as error:
        field = "features.registry" if not override else "features.registry (FEATURES_REGISTRY)"
        raise pipeline.error([(field, f"{error}; expected a views file as docs/pipelines.md describes")]) from None


def view_columns(registry: Registry) -> dict[str, dict[str, FeatureColumn]]:
    """view -> feature -> its dtype and width: what the pipeline's checks need of the registry."""
    return {
        name: {f.name: FeatureColumn(f.dtype, f.length) for f in view.features} for name, view in registry.views.items()
    }


def checked_registry(pipeline: PipelineFile, override: str = "") -> Registry:
    """The pipeline's registry, once every column and fallback vector is found in it."""
    registry = pipeline_registry(pipeline, override)
    check_views(pipeline, view_columns(registry))
    return registry


def checked_layout(pipeline: PipelineFile, override: str = "") -> tuple[Registry, RequestLayout]:
    """The checked registry and how its rows fill the pipeline's model inputs."""
    registry = checked_registry(pipeline, override)
    return registry, request_layout(pipeline, registry)
