"""A job's results file: every request's result once, in input order, as JSON Lines or Parquet.

Written by whichever worker finishes the job's last request (or by any later one that finds
the job done but its file missing), to a temporary name and renamed into place, so a reader
never sees half a file and two workers writing it at once leave one whole one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def result_record(request_id: str, index: int, status: str, error: str = "", reply: Any = None) -> dict[str, Any]:
    """One request's result: its id and position, its status (OK or the gRPC code's name),
    and the RecommendResponse's items, model and trace when it succeeded."""
    record: dict[str, Any] = {"request_id": request_id, "index": index, "status": status, "error": error}
    if reply is not None:
        record.update(
            items=[{"item_id": i.item_id, "score": i.score, "category": i.category} for i in reply.items],
            model_name=reply.model_name,
            model_version=reply.model_version,
            trace_id=reply.trace_id,
            degraded_reasons=list(reply.degraded_reasons),
        )
    return record


def write_results(path: str | Path, results_format: str, results: Iterable[bytes]) -> int:
    """Write `results` (JSON records) sorted by input position; returns how many."""
    records = sorted((json.loads(raw) for raw in results), key=lambda record: record["index"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if results_format == "parquet":
            _write_parquet(Path(tmp), records)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(records)


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    item = pa.struct([("item_id", pa.string()), ("score", pa.float32()), ("category", pa.uint32())])
    schema = pa.schema(
        [
            ("request_id", pa.string()),
            ("index", pa.int64()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("items", pa.list_(item)),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("trace_id", pa.string()),
            ("degraded_reasons", pa.list_(pa.string())),
        ]
    )
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """A results file's records (tests, `infermesh jobs`)."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
