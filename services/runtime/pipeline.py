"""The pipeline file: one YAML declaring what the mesh serves (docs/pipelines.md).

It names the feature views (a views file, or the views embedded), the model(s) to call and
how feature columns fill each named model input, the ranking stages with their parameters,
and the fallback. Every service reads the same file (INFERMESH_PIPELINE; empty: the demo
pipeline shipped beside this module) and checks the part it owns before it serves:

* the format itself here, with pydantic (unknown stages and fields, bad values);
* the views and columns in features (services/features/pipeline_views.py);
* the model inputs (name, datatype, width) in scoring (services/scoring/pipeline_models.py);
* all of them at once in `infermesh up` and `infermesh pipeline check`.

Every error names the file, the field as a path (`models[0].inputs[1].dtype`) and what was
expected. The checks of columns against views and inputs take plain descriptions of them
(FeatureColumn, ModelInput), so this module depends on neither the registry nor the
model repository: the services, below it in the layers, give what they know.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings, SettingsError, load_settings

# The demo pipeline: today's reference workload (views, ranker, chain, fallback).
DEMO_PIPELINE = Path(__file__).with_name("pipelines") / "demo.yaml"
FORMAT_VERSION = 1

# Ranking stages a pipeline may name (services/ranking/chain.py implements them).
SEEN_FILTER, RULES, CALIBRATION, CATEGORY_CAP, MMR = "seen_filter", "rules", "calibration", "category_cap", "mmr"
STAGE_NAMES = (SEEN_FILTER, RULES, CALIBRATION, CATEGORY_CAP, MMR)
# Triton's tensor data types a pipeline input may declare, and the feature dtypes
# (services/features/registry.py) whose values each takes without conversion.
INPUT_DTYPES = ("FP32", "FP64", "INT32", "INT64")
FEATURE_DTYPE_OF_INPUT = {"FP32": "float32", "FP64": "float64", "INT32": "int32", "INT64": "int64"}
_COLUMN = r"^[A-Za-z][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*$"
_MOST_ECHOED = 80


class PipelineError(SettingsError):
    """The pipeline file is unreadable or wrong; each line names the file, field and expectation."""


class PipelineSettings(ServiceSettings):
    """The pipeline every service serves; `infermesh up --pipeline FILE` sets it for all of them."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", env_ignore_empty=True)

    pipeline: str = Field(
        "",
        description=(
            "The pipeline file (YAML: feature views, models and their inputs, ranking stages, fallback; "
            "docs/pipelines.md). Empty: the demo pipeline shipped in the package."
        ),
    )


# ----------------------------------------------------------------------------- format


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())


class FeaturesSpec(_Strict):
    # A path (relative to the pipeline file) of a views file, the views file's content
    # embedded, or nothing: the built-in reference views (services/features/registry.py).
    registry: str | dict[str, Any] | None = None


class InputSpec(_Strict):
    name: str = Field(min_length=1)
    dtype: Literal[INPUT_DTYPES]  # type: ignore[valid-type]
    # `view.feature`, in order: the input's row is these features' values side by side.
    columns: list[Annotated[str, Field(pattern=_COLUMN)]] = Field(min_length=1)


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    version: str = ""  # a version number; empty: the latest the repository serves
    output: str = Field("score", min_length=1)
    inputs: list[InputSpec] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _version_number(cls, version: str) -> str:
        if version and not (version.isdigit() and int(version) >= 1):
            raise ValueError(f'got {version[:40]!r}; expected a version number such as "3", or none for the latest')
        return version

    @model_validator(mode="after")
    def _unique_inputs(self) -> ModelSpec:
        names = [i.name for i in self.inputs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"input names must be unique; {repeated} repeated")
        return self


class SeenFilterStage(_Strict):
    stage: Literal["seen_filter"]


class RulesStage(_Strict):
    stage: Literal["rules"]
    deny_categories: list[int] = []
    min_score: float = -math.inf
    max_score: float = Field(math.inf, validate_default=True)

    @field_validator("max_score")
    @classmethod
    def _passable(cls, max_score: float, info: ValidationInfo) -> float:
        min_score = info.data.get("min_score", -math.inf)
        if min_score > max_score:
            raise ValueError(f"{max_score:g} is below min_score {min_score:g}; expected a bound some score can pass")
        return max_score


class CalibrationStage(_Strict):
    stage: Literal["calibration"]
    method: Literal["none", "platt", "piecewise"] = "none"
    a: float = Field(1.0, gt=0)  # platt: the slope (> 0 keeps the order)
    b: float = 0.0  # platt: the offset
    score: Literal["probability", "logit"] = "probability"  # platt: what the incoming scores are
    points: list[tuple[float, float]] = Field(
        [], validate_default=True
    )  # piecewise: (x, y), x increasing, y non-decreasing

    @field_validator("points")
    @classmethod
    def _monotone(cls, points: list[tuple[float, float]], info: ValidationInfo) -> list[tuple[float, float]]:
        if info.data.get("method") != "piecewise":
            return points
        xs, ys = [x for x, _ in points], [y for _, y in points]
        if len(xs) < 2 or not all(math.isfinite(v) for v in xs + ys):
            raise ValueError("expected at least two finite [x, y] points for method piecewise")
        if any(b <= a for a, b in zip(xs, xs[1:], strict=False)) or any(
            b < a for a, b in zip(ys, ys[1:], strict=False)
        ):
            raise ValueError("expected x increasing and y non-decreasing (a monotone map)")
        return points


class CategoryCapStage(_Strict):
    # How many per category is each request's max_per_category (the gateway's default).
    stage: Literal["category_cap"]


class MmrStage(_Strict):
    stage: Literal["mmr"]
    lambda_: float = Field(1.0, ge=0, le=1, alias="lambda")  # 1: pure relevance, the stage does not run
    top_n: int = Field(100, ge=1)


StageSpec = Annotated[
    SeenFilterStage | RulesStage | CalibrationStage | CategoryCapStage | MmrStage, Field(discriminator="stage")
]


class RankingSpec(_Strict):
    stages: list[StageSpec] = []

    @field_validator("stages")
    @classmethod
    def _each_once(cls, stages: list[Any]) -> list[Any]:
        names = [s.stage for s in stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each stage may appear once; {repeated} repeated")
        return stages


class FallbackSpec(_Strict):
    # dot_product: sigmoid(user . item / sqrt(dim)) of the two vectors below; neutral: every
    # item scores neutral_score.
    scores: Literal["dot_product", "neutral"] = "dot_product"
    user_vector: str = Field(default="user.vec", pattern=_COLUMN)
    item_vector: str = Field(default="item.vec", pattern=_COLUMN)
    neutral_score: float = Field(default=0.5, ge=0, le=1)
    model_name: str = Field(default="fallback-dot-product", min_length=1)  # model_name of fallback-scored responses


class IngestSpec(_Strict):
    view: str = Field(min_length=1)
    file: str = Field(min_length=1)  # CSV or Parquet, relative to the pipeline file


class DataSpec(_Strict):
    # What `infermesh up` serves the pipeline from, instead of seeding the demo's data:
    # the model repository (relative to the pipeline file) and the files it ingests into
    # the views (`infermesh features ingest`, one materialization each, switched atomically).
    model_repository: str = Field(min_length=1)
    ingest: list[IngestSpec] = Field(min_length=1)


class Pipeline(_Strict):
    version: Literal[1]
    name: str = Field(min_length=1)
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    models: list[ModelSpec] = Field(min_length=1)
    ranking: RankingSpec = Field(default_factory=RankingSpec)
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    data: DataSpec | None = None  # left out: `up` seeds the demo's data

    @property
    def model(self) -> ModelSpec:
        """The model the gateway scores with when no experiment arm names another: the first."""
        return self.models[0]


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True, eq=False)
class PipelineFile:
    """A parsed pipeline and the file it came from (every error names it)."""

    path: Path
    spec: Pipeline

    def error(self, problems: Sequence[tuple[str, str]]) -> PipelineError:
        """One PipelineError of (field path, problem) pairs, a line each."""
        return PipelineError("\n".join(f"{self.path}: {field}: {problem}" for field, problem in problems))

    def registry_source(self) -> Path | dict[str, Any] | None:
        """The views: a file (relative paths from the pipeline's folder), embedded, or None (built-in)."""
        registry = self.spec.features.registry
        if isinstance(registry, str):
            return self.resolve(registry)
        return registry

    def resolve(self, path: str) -> Path:
        """A path the file names: relative ones are from the pipeline file's folder."""
        named = Path(path)
        return named if named.is_absolute() else self.path.parent / named


def load_pipeline(path: str | Path | None = None) -> PipelineFile:
    """The pipeline at `path` (None or empty: the demo); PipelineError naming file and field."""
    source = Path(path) if path else DEMO_PIPELINE
    try:
        doc = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or error
        raise PipelineError(f"{source}: cannot read the pipeline file: {why}") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{source}: not valid YAML: {_bounded(str(error), 300)}") from None
    if not isinstance(doc, Mapping):
        raise PipelineError(f"{source}: expected a mapping with version, name, features, models, ranking, fallback")
    try:
        spec = Pipeline.model_validate(doc)
    except ValidationError as error:
        raise PipelineFile(source, Pipeline.model_construct()).error(_problems(error)) from None
    return PipelineFile(source, spec)


def pipeline_from_env(environ: Mapping[str, str] | None = None) -> PipelineFile:
    """The pipeline INFERMESH_PIPELINE names (the demo when unset), as every service loads it."""
    return load_pipeline(load_settings(PipelineSettings, environ).pipeline or None)


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    return [(_path(p["loc"], p["type"]), _message(p)) for p in error.errors(include_url=False)]


def _path(loc: Sequence[str | int], kind: str) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif i and isinstance(loc[i - 1], int) and part in STAGE_NAMES and loc[:2] == ("ranking", "stages"):
            continue  # the union's tag pydantic adds after a stage's index: not a field
        else:
            parts.append(str(part))
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        parts.append("stage")
    return ".".join(parts) or "(top level)"


def _message(problem: Mapping[str, Any]) -> str:
    kind, context, given = problem["type"], problem.get("ctx", {}), problem.get("input")
    if kind == "union_tag_invalid":
        return f"unknown stage {_echo(context.get('tag'))}; expected one of {', '.join(STAGE_NAMES)}"
    if kind == "union_tag_not_found":
        return f"required, missing; expected one of {', '.join(STAGE_NAMES)}"
    if kind == "literal_error":
        return f"got {_echo(given)}; expected {context.get('expected')}"
    if kind == "missing":
        return "required, missing"
    if kind == "extra_forbidden":
        return "unknown field; expected only the fields docs/pipelines.md lists"
    if kind == "string_pattern_mismatch":
        return f"got {_echo(given)}; expected `view.feature`, e.g. user.vec"
    if kind == "value_error" and context.get("error") is not None:
        return str(context["error"])
    message = str(problem["msg"])
    if message.startswith("Input should be "):
        return f"got {_echo(given)}; expected {message.removeprefix('Input should be ')}"
    return f"{message}; got {_echo(given)}"


def _echo(value: Any) -> str:
    return _bounded(repr(value), _MOST_ECHOED)


def _bounded(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class FeatureColumn:
    """One declared feature, as the checks need it: its dtype and how many columns it fills."""

    dtype: str  # float32 | float64 | int32 | int64
    length: int


@dataclass(frozen=True)
class ModelInput:
    """One input of a model, as its repository declares it."""

    name: str
    datatype: str  # FP32, INT64, ...
    shape: tuple[int, ...]  # batch dimension included; -1: any size


def check_views(pipeline: PipelineFile, views: Mapping[str, Mapping[str, FeatureColumn]]) -> None:
    """Every column and fallback vector names a declared view and feature whose dtype fits
    the input; PipelineError listing every problem. `views`: view -> feature -> column."""
    problems: list[tuple[str, str]] = []
    for m, model in enumerate(pipeline.spec.models):
        for i, spec in enumerate(model.inputs):
            wanted = FEATURE_DTYPE_OF_INPUT[spec.dtype]
            for c, column in enumerate(spec.columns):
                where = f"models[{m}].inputs[{i}].columns[{c}]"
                feature = _resolve(column, views, where, problems)
                if feature is not None and feature.dtype != wanted:
                    problems.append(
                        (
                            where,
                            f"{column} is {feature.dtype}; expected {wanted}, as input {spec.name!r} is {spec.dtype}",
                        )
                    )
    fallback = pipeline.spec.fallback
    if fallback.scores == "dot_product":
        user = _resolve(fallback.user_vector, views, "fallback.user_vector", problems)
        item = _resolve(fallback.item_vector, views, "fallback.item_vector", problems)
        if user is not None and item is not None and user.length != item.length:
            problems.append(
                (
                    "fallback.item_vector",
                    f"{fallback.item_vector} has {item.length} values; expected {user.length}, "
                    f"as many as {fallback.user_vector} (a dot product)",
                )
            )
    if problems:
        raise pipeline.error(problems)


def _resolve(
    column: str, views: Mapping[str, Mapping[str, FeatureColumn]], where: str, problems: list[tuple[str, str]]
) -> FeatureColumn | None:
    view, _, feature = column.partition(".")
    if view not in views:
        problems.append((where, f"no view {view!r} is declared; expected one of the views {', '.join(sorted(views))}"))
        return None
    features = views[view]
    if feature not in features:
        known = ", ".join(features)
        problems.append((where, f"view {view!r} has no feature {feature!r}; expected one of its features {known}"))
        return None
    return features[feature]


def input_width(spec: InputSpec, views: Mapping[str, Mapping[str, FeatureColumn]]) -> int | None:
    """How many values one row of the input holds (its columns' lengths added up); None
    when a column names no declared feature (check_views says which)."""
    columns = [column.partition(".") for column in spec.columns]
    if any(feature not in views.get(view, {}) for view, _, feature in columns):
        return None
    return sum(views[view][feature].length for view, _, feature in columns)


def check_model(
    pipeline: PipelineFile,
    index: int,
    inputs: Sequence[ModelInput],
    where: str,
    views: Mapping[str, Mapping[str, FeatureColumn]] | None = None,
) -> None:
    """models[index]'s inputs against the model's own (`where`: the file they were read from):
    every input named, of the model's datatype and, when `views` are known, of its width."""
    model = pipeline.spec.models[index]
    by_name = {i.name: i for i in inputs}
    has = ", ".join(f"{i.name!r} {i.datatype} {list(i.shape)}" for i in inputs) or "none"
    problems: list[tuple[str, str]] = []
    for i, spec in enumerate(model.inputs):
        field = f"models[{index}].inputs[{i}]"
        actual = by_name.get(spec.name)
        if actual is None:
            problems.append(
                (f"{field}.name", f"model {model.name!r} has no input {spec.name!r}; expected one of {has} ({where})")
            )
            continue
        if spec.dtype != actual.datatype:
            problems.append(
                (
                    f"{field}.dtype",
                    f"{spec.dtype}; expected {actual.datatype}, the datatype of input {spec.name!r} ({where})",
                )
            )
        width = input_width(spec, views) if views is not None else None
        if width is not None:
            problems += _width_problems(field, spec, actual, width, where)
    left_out = sorted(set(by_name) - {s.name for s in model.inputs})
    if left_out:
        problems.append(
            (
                f"models[{index}].inputs",
                f"leaves out the model's inputs {left_out}; expected every input: {has} ({where})",
            )
        )
    if problems:
        raise pipeline.error(problems)


def _width_problems(field: str, spec: InputSpec, actual: ModelInput, width: int, where: str) -> list[tuple[str, str]]:
    shape = list(actual.shape)
    if len(shape) != 2:
        return [
            (
                f"{field}.columns",
                f"input {spec.name!r} has shape {shape}; expected [rows, width], as columns fill rows ({where})",
            )
        ]
    if shape[1] not in (-1, width):
        return [
            (
                f"{field}.columns",
                f"{width} values per row; expected {shape[1]}, the width of input {spec.name!r} ({where})",
            )
        ]
    return []
