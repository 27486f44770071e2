"""A job's input: Recommend requests from JSON Lines, Parquet or a list of dicts, validated whole.

Each request is a RecommendRequest in its JSON form (`user_id`, `candidate_ids`, `k`, ...)
plus an optional `request_id` that keys its result (default: its 0-based position, `r<n>`).
Everything is checked before anything is stored, so a bad line refuses the whole job and
nothing is half-submitted; the error names the line (JSON Lines, 1-based) or row (Parquet,
0-based) and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.runtime.errors import InvalidArgument
from services.runtime.limits import DEFAULT_MAX_ID_LENGTH, echo

MAX_CANDIDATES = 1000
MAX_K = 1000
FORMATS = ("jsonl", "parquet")


@dataclass(frozen=True)
class JobRequest:
    request_id: str
    # The RecommendRequest, serialized: what the worker sends, byte for byte.
    payload: bytes


def format_of(path: str | Path) -> str:
    """jsonl or parquet, from the file name (.jsonl/.ndjson/.json, .parquet/.pq)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise InvalidArgument(f"{Path(path).name}: unknown job file format {suffix!r}; use .jsonl or .parquet")


def read_file(path: str | Path, max_requests: int) -> list[JobRequest]:
    """Every request of a JSON Lines or Parquet job file, validated; InvalidArgument otherwise."""
    path = Path(path)
    kind = format_of(path)
    if not path.is_file():
        raise InvalidArgument(f"{path}: no such job file")
    if kind == "jsonl":
        return validate(_jsonl_rows(path), max_requests, "line", first=1)
    return validate(_parquet_rows(path), max_requests, "row", first=0)


def _jsonl_rows(path: Path) -> Iterator[Any]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                yield _BLANK
                continue
            try:
                yield json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise InvalidArgument(f"line {number}: not JSON ({error})") from None


def _parquet_rows(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq  # only Parquet jobs pay for the import

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 (pyarrow raises several kinds for a bad file)
        raise InvalidArgument(f"{path.name}: not a Parquet file ({error})") from None
    for batch in table.to_batches(max_chunksize=10_000):
        yield from batch.to_pylist()


_BLANK = object()  # a blank line in JSON Lines: skipped, but still counted for line numbers


def validate(rows: Iterable[Any], max_requests: int, unit: str = "request", first: int = 0) -> list[JobRequest]:
    """`rows` (dicts) as JobRequests; the first bad one raises InvalidArgument naming it
    (`unit` and its number, counted from `first`)."""
    requests: list[JobRequest] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=first):
        if row is _BLANK:
            continue
        where = f"{unit} {number}"
        if len(requests) >= max_requests:
            raise InvalidArgument(f"{where}: a job holds at most {max_requests} requests")
        request = parse_request(row, where, default_id=f"r{len(requests)}")
        if request.request_id in seen:
            raise InvalidArgument(
                f"{where}: request_id {echo(request.request_id)} is also the id of {unit} {seen[request.request_id]}"
            )
        seen[request.request_id] = number
        requests.append(request)
    if not requests:
        raise InvalidArgument("the job holds no requests")
    return requests


def parse_request(row: Any, where: str, default_id: str) -> JobRequest:
    """One request: a mapping in RecommendRequest's JSON form plus an optional request_id."""
    if not isinstance(row, Mapping):
        raise InvalidArgument(f"{where}: expected a JSON object with user_id and candidate_ids")
    fields = {name: value for name, value in row.items() if value is not None}
    request_id = fields.pop("request_id", default_id)
    if not isinstance(request_id, str) or not request_id or len(request_id) > DEFAULT_MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{where}: request_id must be a non-empty string of at most {DEFAULT_MAX_ID_LENGTH} characters"
        )
    message = gateway_pb2.RecommendRequest()
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as error:
        raise InvalidArgument(f"{where}: {error}") from None
    _check(message, where)
    return JobRequest(request_id, message.SerializeToString())


def _check(request: gateway_pb2.RecommendRequest, where: str) -> None:
    """What the gateway would refuse, refused now: the whole job, before any of it runs."""
    if not request.user_id:
        raise InvalidArgument(f"{where}: user_id is missing or empty")
    if len(request.user_id) > DEFAULT_MAX_ID_LENGTH:
        raise InvalidArgument(f"{where}: user_id is longer than {DEFAULT_MAX_ID_LENGTH} characters")
    count = len(request.candidate_ids)
    if count == 0 and request.retrieve_candidates == 0:
        raise InvalidArgument(f"{where}: candidate_ids is missing or empty (and retrieve_candidates is not set)")
    if count > MAX_CANDIDATES:
        raise InvalidArgument(f"{where}: candidate_ids has {count} items; at most {MAX_CANDIDATES}")
    # The field read once (each read builds every str again), then one C pass per bound.
    lengths = list(map(len, request.candidate_ids))
    if count and (min(lengths) == 0 or max(lengths) > DEFAULT_MAX_ID_LENGTH):
        raise InvalidArgument(
            f"{where}: candidate_ids holds an empty id or one longer than {DEFAULT_MAX_ID_LENGTH} characters"
        )
    if request.HasField("k") and not 1 <= request.k <= MAX_K:
        raise InvalidArgument(f"{where}: k must be between 1 and {MAX_K}, got {request.k}")
