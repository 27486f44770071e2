"""A model's named inputs, and rows for them: generated from each input's dtype and shape,
or read from the user's own feature file (Parquet or CSV).

`models quantize` (calibration and evaluation rows) and `drift baseline` (the reference
distribution) share it, so any model works, not only the demo's one FP32 [-1, 64] input.

File columns per model input `x` of dtype d and per-row width w (the product of its
non-batch dims), the same convention as `infermesh features ingest`:
  * a column named `x`: a scalar when w == 1, in Parquet also a list column of w values;
  * columns `x_0` .. `x_{w-1}`;
  * or the columns `--columns x=age,price,...` names, in that order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# ONNX element types the tools can generate and read rows for.
_DTYPES: dict[int, np.dtype[Any]] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.INT32: np.dtype(np.int32),
    onnx.TensorProto.BOOL: np.dtype(np.bool_),
}
# Integer inputs that index no embedding table get ids in [0, this).
DEFAULT_ID_RANGE = 100
# Ops that carry indices unchanged on their way to a Gather (ids reshaped or cast first).
_PASS_THROUGH = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast"}
# How much of an offending cell or column list an error message quotes.
_QUOTE = 60


class FeatureDataError(ValueError):
    """The feature file cannot feed the model; the message names the file and the column."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...]  # dims after the batch dim
    # Integer inputs: rows of the embedding table the ids index, when the graph shows one.
    embedding_rows: int | None = None

    @property
    def width(self) -> int:
        return math.prod(self.row_shape)

    def describe(self) -> str:
        return f"{self.name!r} ({self.dtype.name} x {self.width})"


def input_specs(model: bytes) -> list[InputSpec]:
    """The model's graph inputs (initializers excluded), in order, with fixed per-row shapes."""
    try:
        graph = onnx.load_model_from_string(model).graph
    except Exception as error:  # protobuf's DecodeError and kin: a truncated or foreign file
        raise FeatureDataError(f"the model file is not an ONNX model ({type(error).__name__}: {error})") from None
    if not graph.input:
        raise FeatureDataError("the model file holds no ONNX graph with inputs (empty or not a model)")
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type not in _DTYPES:
            kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
            raise FeatureDataError(f"model input {value.name!r} is {kind}; supported: float, double, int, bool")
        dims = list(tensor.shape.dim)
        row_shape = []
        for position, dim in enumerate(dims[1:], start=1):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                raise FeatureDataError(
                    f"model input {value.name!r}: dim {position} is {dim.dim_param or 'unknown'!r}, not a fixed size"
                )
            row_shape.append(dim.dim_value)
        dtype = _DTYPES[tensor.elem_type]
        table_rows = _embedding_rows(graph, value.name, initializers) if dtype.kind == "i" else None
        specs.append(InputSpec(value.name, dtype, tuple(row_shape), table_rows))
    return specs


def _embedding_rows(graph: onnx.GraphProto, name: str, initializers: Mapping[str, onnx.TensorProto]) -> int | None:
    """Rows of the smallest table the ids of input `name` index (Gather on an initializer)."""
    names, rows = {name}, []
    for node in graph.node:  # topological order: a pass-through's output is seen before its users
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in names:
            names.update(node.output)
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in names:
            table = initializers.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if table is not None:
                rows.append(table.dims[axis])
    return min(rows) if rows else None


def generate_rows(specs: Sequence[InputSpec], rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random rows per input: N(0, 1) floats, fair bools, ids uniform over the rows of the
    embedding table they index (else over [0, DEFAULT_ID_RANGE))."""
    feed = {}
    for spec in specs:
        shape = (rows, *spec.row_shape)
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = rng.random(shape) < 0.5
        else:
            feed[spec.name] = rng.integers(0, spec.embedding_rows or DEFAULT_ID_RANGE, shape).astype(spec.dtype)
    return feed


def parse_column_map(items: Iterable[str]) -> dict[str, list[str]]:
    """`--columns INPUT=COL,COL,...` items as {input: [columns]}."""
    mapping: dict[str, list[str]] = {}
    for item in items:
        name, sep, columns = item.partition("=")
        listed = [c.strip() for c in columns.split(",") if c.strip()]
        if not sep or not name.strip() or not listed:
            raise FeatureDataError(f"--columns {item[:_QUOTE]!r}: expected INPUT=COLUMN[,COLUMN...]")
        mapping[name.strip()] = listed
    return mapping


@dataclass(frozen=True)
class FeatureRows:
    """Rows for each model input, read from a file, and the file columns each came from."""

    inputs: dict[str, np.ndarray]  # input name -> [rows, *row_shape] in the model's dtype
    columns: dict[str, list[str]]  # input name -> one name per value of a row, in order
    rows: int


def read_table(path: Path, columns: Sequence[str] | None = None) -> Any:
    """The file as a pyarrow Table: Parquet by suffix (.parquet, .pq), CSV otherwise."""
    import pyarrow as pa  # heavy imports, only here
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FeatureDataError(f"{path}: no such file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path, columns=list(columns) if columns else None)
        options = pacsv.ConvertOptions(include_columns=list(columns) if columns else None)
        return pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as error:
        raise FeatureDataError(f"{path}: not a readable {_format(path)} file ({str(error)[:200]})") from None


def _format(path: Path) -> str:
    return "Parquet" if path.suffix.lower() in (".parquet", ".pq") else "CSV"


def input_columns(
    spec: InputSpec, available: Sequence[str], explicit: Mapping[str, list[str]], path: Path
) -> list[str]:
    """The file columns that hold `spec`'s values (see the module's docstring)."""
    if spec.name in explicit:
        listed = explicit[spec.name]
        missing = [c for c in listed if c not in available]
        if missing:
            raise FeatureDataError(
                f"{path}: no column {missing[0][:_QUOTE]!r} (--columns {spec.name}=...); "
                f"the file has {_quote_columns(available)}"
            )
        return listed
    if spec.name in available:
        return [spec.name]
    numbered = [f"{spec.name}_{i}" for i in range(spec.width)]
    if all(c in available for c in numbered):
        return numbered
    expected = (
        f"a column {spec.name!r}"
        if spec.width == 1
        else f"a list column {spec.name!r} of {spec.width} or columns {numbered[0]!r}..{numbered[-1]!r}"
    )
    raise FeatureDataError(
        f"{path}: no column for model input {spec.describe()}: expected {expected}, "
        f"or name them with --columns {spec.name}=COLUMN,...; the file has {_quote_columns(available)}"
    )


def _quote_columns(columns: Sequence[str]) -> str:
    shown = ", ".join(repr(c[:_QUOTE]) for c in columns[:12])
    return f"{shown}{', ...' if len(columns) > 12 else ''}" if columns else "no columns"


def read_rows(
    path: Path, specs: Sequence[InputSpec], explicit: Mapping[str, list[str]] | None = None, *, limit: int = 0
) -> FeatureRows:
    """Each input's rows from the file, checked against the input's dtype and width;
    `limit` > 0 keeps the first `limit` rows."""
    path = Path(path)
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - {spec.name for spec in specs})
    if unknown:
        names = ", ".join(repr(spec.name) for spec in specs)
        raise FeatureDataError(f"--columns names {unknown[0][:_QUOTE]!r}, not an input of the model ({names})")
    table = read_table(path)
    if limit > 0:
        table = table.slice(0, limit)
    inputs, columns = {}, {}
    for spec in specs:
        used = input_columns(spec, table.column_names, explicit, path)
        values = np.concatenate([_column_values(table, column, spec, path) for column in used], axis=1)
        if values.shape[1] != spec.width:
            raise FeatureDataError(
                f"{path}: columns {_quote_columns(used)} give {values.shape[1]} values per row; "
                f"model input {spec.describe()} needs {spec.width}"
            )
        inputs[spec.name] = values.reshape(table.num_rows, *spec.row_shape)
        columns[spec.name] = _value_names(used, values.shape[1])
    return FeatureRows(inputs, columns, table.num_rows)


def _value_names(used: list[str], width: int) -> list[str]:
    """One name per value: the columns themselves, or `col_i` for one list column."""
    if len(used) == width:
        return list(used)
    return [f"{used[0]}_{i}" for i in range(width)]


def _column_values(table: Any, column: str, spec: InputSpec, path: Path) -> np.ndarray:
    """[rows, values] of one column in spec's dtype: a scalar column gives one value per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    data = table.column(column)
    kind = data.type
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    _check_type(kind.value_type if listed else kind, column, spec, path)
    if data.null_count:
        cells = "cell" if data.null_count == 1 else "cells"
        raise FeatureDataError(
            f"{path}: column {column!r} has {data.null_count} empty {cells}; model input {spec.name!r} needs a value "
            "in every row"
        )
    if not listed:
        return _as_dtype(data.to_numpy(), column, spec, path).reshape(-1, 1)
    lengths = set(pc.list_value_length(data).to_pylist())
    if len(lengths) > 1:
        raise FeatureDataError(f"{path}: list column {column!r} has rows of {len(lengths)} different lengths")
    flat = pc.list_flatten(data)
    if flat.null_count:
        raise FeatureDataError(f"{path}: list column {column!r} has empty values; model input {spec.name!r}")
    width = lengths.pop() if lengths else 0
    return _as_dtype(flat.to_numpy(zero_copy_only=False), column, spec, path).reshape(len(data), width)


def _check_type(kind: Any, column: str, spec: InputSpec, path: Path) -> None:
    import pyarrow as pa

    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise FeatureDataError(f"{path}: column {column!r} is {kind}; model input {spec.describe()} needs numbers")


def _as_dtype(values: np.ndarray, column: str, spec: InputSpec, path: Path) -> np.ndarray:
    """Values cast to the input's dtype; ids must be whole numbers, floats finite."""
    if spec.dtype.kind in "iu":
        if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
            raise FeatureDataError(
                f"{path}: column {column!r} holds fractional values; model input {spec.describe()} takes whole ids"
            )
        rows = spec.embedding_rows
        if rows is not None and values.size and (values.min() < 0 or values.max() >= rows):
            raise FeatureDataError(
                f"{path}: column {column!r} has ids outside [0, {rows}), the rows of the embedding "
                f"table model input {spec.name!r} indexes"
            )
    elif values.dtype.kind == "f" and not np.isfinite(values).all():
        raise FeatureDataError(f"{path}: column {column!r} has non-finite values; model input {spec.name!r}")
    return values.astype(spec.dtype)
