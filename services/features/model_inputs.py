"""How a reference request's feature rows fill the model's named inputs (docs/pipelines.md).

The pipeline file maps `view.feature` columns to each named model input, with its dtype.
A RequestLayout is that mapping resolved against the views once, at start: for each input,
which view and feature fills which columns, and whether the value is the user's (the same
in every row) or the item's (one per row). The store then fills each input with a few
numpy slice assignments per request, one per column: no per-item Python.

Besides the model's inputs, a request carries the pipeline's fallback vectors as rows
[user vector, item vector] (FP32): the gateway's fallback dot product and ranking's
diversity stage compare them. When the model's one input is exactly those rows (the demo
pipeline), it is sent once, as both.

A view plays the user's part when it is of the user view's entity in the registry's
`reference` section, the item's when of the item view's; the same section names the item
category that ranking caps on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.features.registry import DTYPES, Registry
from services.runtime.pipeline import FEATURE_DTYPE_OF_INPUT, PipelineFile

# The fallback vectors' row: float32, whatever the features' own dtype.
_VECTORS_DATATYPE = "FP32"


@dataclass(frozen=True)
class ColumnSource:
    """Columns [start, stop) of an input: feature `feature` of view `view`, the user's
    value broadcast to every row (`of_user`) or each row's item's."""

    view: str
    feature: str
    of_user: bool
    start: int
    stop: int


@dataclass(frozen=True)
class InputLayout:
    """One tensor of a response: its name (a model input's; empty for the fallback
    vectors alone), datatype and the columns that fill each row."""

    name: str
    datatype: str  # OIP: FP32, INT64, ...
    width: int
    columns: tuple[ColumnSource, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[FEATURE_DTYPE_OF_INPUT[self.datatype]])


@dataclass(frozen=True)
class RequestLayout:
    # The model's inputs; empty when `vectors` is the model's one input (sent once).
    inputs: tuple[InputLayout, ...]
    # [user vector, item vector] rows for the fallback and diversity; None: the pipeline
    # names no fallback vectors.
    vectors: InputLayout | None
    user_columns: int  # the user vector's width in `vectors`
    user_views: tuple[str, ...]  # read with the request's user id (the reference user view first)
    item_views: tuple[str, ...]  # read with its item ids (the reference item view first)


def reference_layout(registry: Registry) -> RequestLayout | None:
    """The layout without a pipeline file: one FP32 input `features` of [user vector, item
    vector] from the registry's reference section (the demo's); None when it names no vector."""
    reference = registry.reference
    if reference is None or reference.vector_feature is None:
        return None
    feature = reference.vector_feature
    user = registry.views[reference.user_view].feature(feature).length
    item = registry.views[reference.item_view].feature(feature).length
    vectors = InputLayout(
        "features",
        _VECTORS_DATATYPE,
        user + item,
        (
            ColumnSource(reference.user_view, feature, True, 0, user),
            ColumnSource(reference.item_view, feature, False, user, user + item),
        ),
    )
    return RequestLayout((), vectors, user, (reference.user_view,), (reference.item_view,))


def request_layout(pipeline: PipelineFile, registry: Registry) -> RequestLayout:
    """The pipeline's first model's inputs and its fallback vectors resolved against the
    views (check_views has found every column); PipelineError naming the field otherwise."""
    reference = registry.reference
    if reference is None:
        raise pipeline.error(
            [
                (
                    "features.registry",
                    "the views declare no `reference` section; expected one naming the user and item views",
                )
            ]
        )
    roles = _Roles(registry)
    inputs = tuple(
        _input(spec.name, spec.dtype, spec.columns, roles, pipeline, f"models[0].inputs[{i}]")
        for i, spec in enumerate(pipeline.spec.model.inputs)
    )
    fallback = pipeline.spec.fallback
    vectors, user_columns = None, 0
    if fallback.scores == "dot_product":
        columns = [fallback.user_vector, fallback.item_vector]
        vectors = _input("", _VECTORS_DATATYPE, columns, roles, pipeline, "fallback")
        _check_parts(vectors, pipeline, roles)
        user_columns = vectors.columns[0].stop
        only = inputs[0] if len(inputs) == 1 else None
        if only is not None and only.datatype == _VECTORS_DATATYPE and only.columns == vectors.columns:
            inputs, vectors = (), only  # the model's input is the fallback's rows: sent once
    used = [c for tensor in (*inputs, vectors) if tensor is not None for c in tensor.columns]
    user_views = _ordered(reference.user_view, [c.view for c in used if c.of_user])
    item_views = _ordered(reference.item_view, [c.view for c in used if not c.of_user])
    return RequestLayout(inputs, vectors, user_columns, user_views, item_views)


class _Roles:
    """Which entity is the user's and which the item's, from the registry's reference views."""

    def __init__(self, registry: Registry) -> None:
        reference = registry.reference
        assert reference is not None
        self.registry = registry
        self.user = registry.views[reference.user_view].entity
        self.item = registry.views[reference.item_view].entity

    def of_user(self, view: str) -> bool | None:
        entity = self.registry.views[view].entity
        return True if entity == self.user else False if entity == self.item else None


def _input(
    name: str, datatype: str, columns: Sequence[str], roles: _Roles, pipeline: PipelineFile, field: str
) -> InputLayout:
    sources, start, problems = [], 0, []
    for c, column in enumerate(columns):
        view, _, feature = column.partition(".")
        of_user = roles.of_user(view)
        if of_user is None:
            entity = roles.registry.views[view].entity
            where = f"{field}.columns[{c}]" if name else ("fallback.user_vector", "fallback.item_vector")[c]
            problems.append(
                (
                    where,
                    f"view {view!r} is of entity {entity!r}; expected a view of the user's ({roles.user!r}) "
                    f"or the item's ({roles.item!r}) entity, as the views' reference section names them",
                )
            )
            continue
        length = roles.registry.views[view].feature(feature).length
        sources.append(ColumnSource(view, feature, of_user, start, start + length))
        start += length
    if problems:
        raise pipeline.error(problems)
    return InputLayout(name, datatype, start, tuple(sources))


def _check_parts(vectors: InputLayout, pipeline: PipelineFile, roles: _Roles) -> None:
    """The fallback's user vector is the user's, its item vector the item's."""
    user, item = vectors.columns
    problems = []
    if not user.of_user:
        problems.append(("fallback.user_vector", f"{user.view}.{user.feature} is an item's; expected a user's feature"))
    if item.of_user:
        problems.append(("fallback.item_vector", f"{item.view}.{item.feature} is a user's; expected an item's feature"))
    if problems:
        raise pipeline.error(problems)


def _ordered(first: str, views: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([first, *views]))
