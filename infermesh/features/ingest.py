"""Load a CSV or Parquet file into a feature view, as a new materialization switched in atomically.

The rows go under a fresh versioned prefix in batched pipelines (one round trip per batch);
only when every good row is written does one guarded SET move the view's pointer to it.
Any failure before that removes what was written and leaves the previous materialization
serving. Bad rows (wrong field count, non-numeric or non-finite values, missing or repeated
ids) are skipped and reported with their line numbers (CSV) or row numbers (Parquet).

File columns: the view's entity id column (e.g. `item_id`), then per feature either a
column named like the feature (scalars; in Parquet also a list column for vectors) or,
for a vector feature `vec` of length n, columns `vec_0` .. `vec_{n-1}`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

from services.features.layout import (
    entity_key_prefix,
    is_versioned,
    materialization_prefix,
    meta_key,
    pointer_key,
    sequence_key,
)
from services.features.registry import DTYPES, TIMESTAMP_FIELD, Feature, FeatureView, Registry
from services.features.retrieval import CandidateIndex

DEFAULT_BATCH_ROWS = 10_000
_UNLINK_CHUNK = 1_000
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


class IngestError(RuntimeError):
    """The ingest stopped; the view still serves what it served before (the message says which)."""


@dataclass(frozen=True)
class BadRow:
    where: str  # "line 17" (CSV) or "row 17" (Parquet)
    reason: str


@dataclass
class IngestReport:
    view: str
    source: str
    rows_read: int = 0
    rows_written: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    seconds: float = 0.0
    prefix: str = ""
    previous_prefix: str = ""
    previous_removed: int = 0
    ignored_columns: list[str] = field(default_factory=list)
    index_path: str | None = None

    @property
    def rate(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Batch:
    """Rows that parsed, with their values per feature (float64 or int64 [rows, length])."""

    ids: list[str]
    places: list[str]
    values: dict[str, np.ndarray]
    bad: list[BadRow]
    rows_read: int


# ------------------------------------------------------------------------------ readers


def _feature_columns(feature: Feature) -> list[str]:
    return [feature.name] if feature.length == 1 else [f"{feature.name}_{i}" for i in range(feature.length)]


def _parse_block(strings: np.ndarray, feature: Feature) -> np.ndarray:
    """Vectorised text -> numbers for one feature's columns; ValueError if any cell is bad."""
    if feature.dtype.startswith("int"):
        return strings.astype(np.int64)
    return strings.astype(np.float64)


def _bad_cell(row: list[str], feature: Feature, columns: list[str]) -> str:
    """Why a row's cells for `feature` do not parse (the slow path, bad rows only)."""
    kind = int if feature.dtype.startswith("int") else float
    for name, cell in zip(columns, row, strict=False):
        try:
            kind(cell)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            return f"column {name!r}: {cell.strip()!r} is not {what}"
    return f"feature {feature.name!r}: unparseable"


def _csv_batches(path: Path, view: FeatureView, batch_rows: int, report: IngestReport) -> Iterator[_Batch]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise IngestError(f"{path}: the file is empty") from None
        index = {name: i for i, name in enumerate(header)}
        wanted = {f.name: _feature_columns(f) for f in view.features}
        needed = [view.id_column, *(c for cols in wanted.values() for c in cols)]
        missing = [c for c in needed if c not in index]
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise IngestError(f"{path}: missing column(s) {shown} for view {view.name!r}")
        report.ignored_columns = [h for h in header if h not in set(needed)]
        positions = {name: [index[c] for c in cols] for name, cols in wanted.items()}
        id_at, width = index[view.id_column], len(header)
        ids: list[str] = []
        places: list[str] = []
        rows: list[list[str]] = []
        bad: list[BadRow] = []
        read = 0
        line = reader.line_num + 1
        for record in reader:
            where = f"line {line}"
            line = reader.line_num + 1
            if not record:
                continue  # blank line
            read += 1
            if len(record) != width:
                bad.append(BadRow(where, f"expected {width} fields, got {len(record)}"))
            else:
                ids.append(record[id_at].strip())
                places.append(where)
                rows.append(record)
            if len(rows) + len(bad) >= batch_rows:
                yield _csv_convert(ids, places, rows, positions, view, bad, read)
                ids, places, rows, bad, read = [], [], [], [], 0
        if rows or bad or read:
            yield _csv_convert(ids, places, rows, positions, view, bad, read)


def _csv_convert(
    ids: list[str],
    places: list[str],
    rows: list[list[str]],
    positions: dict[str, list[int]],
    view: FeatureView,
    bad: list[BadRow],
    read: int,
) -> _Batch:
    if not rows:
        empty = {f.name: np.zeros((0, f.length)) for f in view.features}
        return _Batch(ids=[], places=[], values=empty, bad=bad, rows_read=read)
    table = np.array(rows, dtype=np.str_)
    keep = np.ones(len(rows), dtype=bool)
    values: dict[str, np.ndarray] = {}
    for feature in view.features:
        block = table[:, positions[feature.name]]
        try:
            values[feature.name] = _parse_block(block, feature)
            continue
        except ValueError:
            pass
        # Some cell is bad: parse row by row to find which (bad rows are rare, and so is this path).
        parsed = np.zeros(block.shape, dtype=np.int64 if feature.dtype.startswith("int") else np.float64)
        names = _feature_columns(feature)
        for r in range(len(rows)):
            if not keep[r]:
                continue
            try:
                parsed[r] = _parse_block(block[r], feature)
            except ValueError:
                keep[r] = False
                bad.append(BadRow(places[r], _bad_cell(block[r].tolist(), feature, names)))
        values[feature.name] = parsed
    kept = np.flatnonzero(keep)
    return _Batch(
        ids=[ids[i] for i in kept],
        places=[places[i] for i in kept],
        values={name: v[kept] for name, v in values.items()},
        bad=bad,
        rows_read=read,
    )


class _Rejects:
    """Rows of one batch rejected so far, with the first reason for each."""

    def __init__(self, n: int) -> None:
        self.keep = np.ones(n, dtype=bool)
        self.reasons: dict[int, str] = {}

    def reject(self, mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask & self.keep):
            self.reasons[int(i)] = reason
        self.keep &= ~mask


def _nulls(column: Any) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)


def _parquet_feature(
    columns: list[Any], names: list[str], feature: Feature, rejects: _Rejects, path: Path
) -> np.ndarray:
    """One feature's values [rows, length] from a list column or from one column per element."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target = np.int64 if feature.dtype.startswith("int") else np.float64
    n = len(rejects.keep)
    first = columns[0]
    if len(columns) == 1 and (pa.types.is_list(first.type) or pa.types.is_fixed_size_list(first.type)):
        lengths = pc.fill_null(pc.list_value_length(first), -1).to_numpy(zero_copy_only=False)
        wrong = _nulls(first) | (lengths != feature.length)
        rejects.reject(wrong, f"column {feature.name!r}: expected a list of {feature.length} values")
        block = np.zeros((n, feature.length), dtype=target)
        good = np.flatnonzero(~wrong)
        if len(good):
            flat = pc.list_flatten(first.take(pa.array(good)))
            block[good] = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False).astype(target).reshape(len(good), -1)
            null_rows = np.zeros(n, dtype=bool)
            null_rows[good] = _nulls(flat).reshape(len(good), feature.length).any(axis=1)
            rejects.reject(null_rows, f"column {feature.name!r}: null value in the list")
        return block
    block = np.empty((n, len(columns)), dtype=target)
    for c, (name, column) in enumerate(zip(names, columns, strict=False)):
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise IngestError(f"{path}: column {name!r} is {column.type}, not numeric")
        rejects.reject(_nulls(column), f"column {name!r} is null")
        block[:, c] = pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(target)
    return block


def _parquet_batches(path: Path, view: FeatureView, batch_rows: int, report: IngestReport) -> Iterator[_Batch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise IngestError(f"{path}: not a readable Parquet file: {error}") from error
    names = set(source.schema_arrow.names)
    plan: dict[str, list[str]] = {}
    for f in view.features:
        if f.name in names:
            plan[f.name] = [f.name]
        elif all(c in names for c in _feature_columns(f)):
            plan[f.name] = _feature_columns(f)
        else:
            raise IngestError(f"{path}: missing column {f.name!r} (or {f.name}_0..) for view {view.name!r}")
    if view.id_column not in names:
        raise IngestError(f"{path}: missing column {view.id_column!r} for view {view.name!r}")
    needed = [view.id_column, *(c for cols in plan.values() for c in cols)]
    report.ignored_columns = [n for n in source.schema_arrow.names if n not in set(needed)]
    first = 0
    for batch in source.iter_batches(batch_size=batch_rows, columns=needed):
        n = batch.num_rows
        places = [f"row {first + i + 1}" for i in range(n)]
        rejects = _Rejects(n)
        id_column = batch.column(view.id_column)
        rejects.reject(_nulls(id_column), f"{view.id_column} is null")
        ids = [str(v) if v is not None else "" for v in id_column.to_pylist()]
        values = {
            f.name: _parquet_feature([batch.column(c) for c in plan[f.name]], plan[f.name], f, rejects, path)
            for f in view.features
        }
        kept = np.flatnonzero(rejects.keep)
        yield _Batch(
            ids=[ids[i] for i in kept],
            places=[places[i] for i in kept],
            values={name: v[kept] for name, v in values.items()},
            bad=[BadRow(places[i], rejects.reasons[i]) for i in sorted(rejects.reasons)],
            rows_read=n,
        )
        first += n


# ------------------------------------------------------------------------------ validation


def _validate(batch: _Batch, view: FeatureView, seen: dict[str, str]) -> tuple[list[str], np.ndarray]:
    """Drop rows with out-of-range values or bad ids; returns (ids, packed records)."""
    n = len(batch.ids)
    keep = np.ones(n, dtype=bool)
    reasons: dict[int, str] = {}
    for f in view.features:
        block = batch.values[f.name].reshape(n, f.length)
        if f.dtype.startswith("int"):
            low, high = _INT_RANGE[f.dtype]
            bad = ((block < low) | (block > high)).any(axis=1)
            reason = f"feature {f.name!r}: value out of {f.dtype} range"
        else:
            finite = np.isfinite(block)
            if f.dtype == "float32":
                finite &= np.abs(block) <= np.finfo(np.float32).max
            bad = ~finite.all(axis=1)
            reason = f"feature {f.name!r}: value is not a finite {f.dtype}"
        for i in np.flatnonzero(bad & keep):
            reasons[int(i)] = reason
        keep &= ~bad
    for i, entity in enumerate(batch.ids):
        if not keep[i]:
            continue
        if not entity:
            keep[i], reasons[i] = False, f"empty {view.id_column}"
        elif entity in seen:
            keep[i], reasons[i] = False, f"{view.id_column} {entity!r} repeats {seen[entity]}"
        else:
            seen[entity] = batch.places[i]
    batch.bad.extend(BadRow(batch.places[i], reasons[i]) for i in sorted(reasons))
    batch.bad.sort(key=lambda bad: int(bad.where.split()[1]))
    kept = np.flatnonzero(keep)
    records = np.zeros(len(kept), dtype=view.record_dtype)
    for f in view.features:
        values = batch.values[f.name][kept].astype(DTYPES[f.dtype])
        records[f.name] = values.reshape(len(kept)) if f.length == 1 else values
    if view.timestamped:
        records[TIMESTAMP_FIELD] = time.time()
    return [batch.ids[i] for i in kept], records


# ------------------------------------------------------------------------------ writing


def _write(pipe: Any, view: FeatureView, prefix: str, ids: list[str], records: np.ndarray) -> None:
    """Queue one batch: MSET without a TTL, SET PX per entity with one."""
    size = records.dtype.itemsize
    blob = records.tobytes()
    head = entity_key_prefix(prefix, view.key)
    values = [blob[i : i + size] for i in range(0, len(blob), size)]
    if view.ttl_seconds:
        ttl_ms = max(1, int(view.ttl_seconds * 1000))
        for entity, value in zip(ids, values, strict=False):
            pipe.set(head + entity, value, px=ttl_ms)
    elif ids:
        pipe.mset({head + entity: value for entity, value in zip(ids, values, strict=False)})
    pipe.execute()


def drop_prefix(client: redis.Redis, prefix: str) -> int:
    """Remove every key under `prefix` (SCAN + UNLINK in chunks); returns how many."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=_UNLINK_CHUNK):
        batch.append(key)
        if len(batch) >= _UNLINK_CHUNK:
            removed += client.unlink(*batch)
            batch = []
    if batch:
        removed += client.unlink(*batch)
    return removed


def _switch(client: redis.Redis, pointer: str, expected: bytes | None, new_prefix: str) -> None:
    """Point the view at `new_prefix`, unless another ingest moved it since we started."""
    with client.pipeline() as pipe:
        try:
            pipe.watch(pointer)
            if pipe.get(pointer) != expected:
                raise IngestError("another ingest switched this view while this one ran; nothing switched")
            pipe.multi()
            pipe.set(pointer, new_prefix)
            pipe.execute()
        except redis.WatchError:
            raise IngestError("another ingest switched this view while this one ran; nothing switched") from None


def _count_csv_rows(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return None
    return max(0, lines - 1)


def ingest(
    client: redis.Redis,
    registry: Registry,
    view_name: str,
    path: Path,
    *,
    namespace: str,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool = True,
    max_bad_rows: int | None = None,
    index_path: Path | None = None,
) -> IngestReport:
    """Materialize `path` into the view and switch to it; raises IngestError (nothing switched)."""
    if view_name not in registry.views:
        raise IngestError(f"unknown view {view_name!r}; the registry declares: {', '.join(sorted(registry.views))}")
    view = registry.views[view_name]
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: no such file")
    fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
    retrieval = registry.retrieval
    if index_path is not None and (retrieval is None or retrieval.item_view != view_name):
        raise IngestError(f"--index needs the registry's retrieval item view, not {view_name!r}")
    report = IngestReport(view=view_name, source=str(path))
    started = time.perf_counter()
    pointer = pointer_key(namespace, view_name)
    previous = client.get(pointer)
    report.previous_prefix = previous.decode() if previous else namespace
    prefix = materialization_prefix(namespace, view_name, int(client.incr(sequence_key(namespace, view_name))))
    report.prefix = prefix
    vectors: list[np.ndarray] = []
    all_ids: list[str] = []
    seen: dict[str, str] = {}
    batches = (_parquet_batches if fmt == "parquet" else _csv_batches)(path, view, batch_rows, report)
    total = _count_csv_rows(path) if fmt == "csv" else None
    try:
        with tqdm(total=total, desc=f"ingest {view_name}", unit="row", unit_scale=True, disable=not progress) as bar:
            pipe = client.pipeline(transaction=False)
            for batch in batches:
                ids, records = _validate(batch, view, seen)
                report.bad_rows.extend(batch.bad)
                report.rows_read += batch.rows_read
                if max_bad_rows is not None and len(report.bad_rows) > max_bad_rows:
                    raise IngestError(f"more than {max_bad_rows} bad rows (see the report)")
                _write(pipe, view, prefix, ids, records)
                report.rows_written += len(ids)
                if index_path is not None and retrieval is not None:
                    vectors.append(records[retrieval.vector_feature].reshape(len(ids), -1))
                    all_ids.extend(ids)
                bar.update(batch.rows_read)
        if report.rows_written == 0:
            raise IngestError(f"{path}: no good rows; refusing to serve an empty view")
        client.set(meta_key(prefix), json.dumps(_meta(view, report)))
        _switch(client, pointer, previous, prefix)
    except BaseException as error:
        with contextlib.suppress(redis.RedisError):  # what is left is never served: nothing points at it
            drop_prefix(client, prefix)
        if isinstance(error, IngestError):
            raise IngestError(f"{error}; view {view_name!r} still serves {report.previous_prefix!r}") from None
        if isinstance(error, redis.RedisError):
            raise IngestError(
                f"Redis failed during ingest ({error}); view {view_name!r} still serves {report.previous_prefix!r}"
            ) from error
        raise
    if previous and is_versioned(namespace, report.previous_prefix):
        # Readers that still hold the old prefix see the pointer move in their MGET and re-read.
        report.previous_removed = drop_prefix(client, report.previous_prefix)
    if index_path is not None:
        CandidateIndex.build(np.concatenate(vectors), all_ids, {"view": view_name, "prefix": prefix}).save(index_path)
        report.index_path = str(index_path)
    report.seconds = time.perf_counter() - started
    return report


def _meta(view: FeatureView, report: IngestReport) -> dict[str, Any]:
    return {
        "view": view.name,
        "source": report.source,
        "rows": report.rows_written,
        "bad_rows": len(report.bad_rows),
        "record_bytes": view.record_dtype.itemsize,
        "columns": view.columns,
        "materialized_at": time.time(),
    }


def format_report(report: IngestReport, show_bad: int = 20) -> str:
    lines = [
        f"ingested view {report.view!r} from {report.source}: {report.rows_read:,} rows read, "
        f"{report.rows_written:,} written, {len(report.bad_rows):,} bad rows skipped, "
        f"in {report.seconds:.2f}s ({report.rate:,.0f} rows/s)",
        f"now serving {report.prefix} (was {report.previous_prefix}"
        + (f"; its {report.previous_removed:,} keys were removed)" if report.previous_removed else ")"),
    ]
    if report.ignored_columns:
        lines.append(f"ignored columns: {', '.join(report.ignored_columns)}")
    if report.index_path:
        lines.append(f"candidate index rebuilt: {report.index_path}")
    if report.bad_rows:
        lines.append("bad rows:")
        lines += [f"  {bad.where}: {bad.reason}" for bad in report.bad_rows[:show_bad]]
        if len(report.bad_rows) > show_bad:
            lines.append(f"  ... {len(report.bad_rows) - show_bad:,} more (--bad-rows-out FILE lists them all)")
    return "\n".join(lines)
