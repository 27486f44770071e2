"""`infermesh features ingest` against a real redis-server of this module's own.

Acceptance: a 100,000-row file with malformed rows finishes with an exact report (line
numbers and reasons); re-running it is idempotent; a failed ingest leaves the previous
materialization serving and nothing of its own behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from infermesh.cli import main as infermesh
from infermesh.features import ingest as ingest_module
from infermesh.features.ingest import IngestError, ingest
from infermesh.up.supervisor import free_port, start_redis
from services.features.layout import pointer_key
from services.features.registry import load_registry, parse_registry
from services.features.retrieval import CandidateIndex

REGISTRY_TEXT = """
entities:
  item: {id_column: item_id}
views:
  emb:
    entity: item
    key: e
    ttl_seconds: 3600
    features:
      - {name: vec, dtype: float32, shape: 8, default: 0}
      - {name: cat, dtype: int32, default: -1}
"""
REGISTRY = parse_registry(yaml.safe_load(REGISTRY_TEXT))
EMB = REGISTRY.views["emb"]
HEADER = "item_id," + ",".join(f"vec_{i}" for i in range(8)) + ",cat\n"
# (data row index where it is injected, the line, a phrase its reason must contain)
MALFORMED = [
    (10, "short,1,2\n", "expected 10 fields, got 3"),
    (2_500, "i5," + "1," * 8 + "2\n", "item_id 'i5' repeats line 7"),
    (17_000, "bad3,abc" + ",1" * 7 + ",2\n", "column 'vec_0': 'abc' is not a number"),
    (40_000, "bad4" + ",1" * 8 + ",2.5\n", "column 'cat': '2.5' is not an integer"),
    (55_555, "bad5,nan" + ",1" * 7 + ",2\n", "not a finite float32"),
    (70_001, "," + "1," * 8 + "2\n", "empty item_id"),
    (88_888, "bad7" + ",1" * 8 + ",99999999999\n", "out of int32 range"),
    (99_999, "bad8" + ",1" * 7 + ",,2\n", "column 'vec_7': '' is not a number"),
]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("features-ingest-redis")
    port = free_port()
    process = start_redis(workdir, port, workdir / "logs", persist=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    c.flushdb()  # our own server: each test starts empty
    yield c
    c.close()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, dict[int, str]]:
    """100,000 good rows plus MALFORMED; returns (path, vec, {line number: reason phrase})."""
    n = 100_000
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((n, 8)).astype(np.float32)
    cat = rng.integers(0, 50, n)
    # 17 significant digits write the float64 of each float32 exactly, so parsing gives it back.
    cells = np.char.mod("%.17g", vec.astype(np.float64))
    good = [f"i{i}," + ",".join(cells[i]) + f",{cat[i]}\n" for i in range(n)]
    lines, expected = [], {}
    inject = {at: (line, phrase) for at, line, phrase in MALFORMED}
    for i, row in enumerate(good):
        if i in inject:
            line, phrase = inject[i]
            lines.append(line)
            expected[len(lines) + 1] = phrase  # +1: the header is line 1
        lines.append(row)
    path = tmp_path_factory.mktemp("ingest") / "emb.csv"
    path.write_text(HEADER + "".join(lines))
    return path, vec, expected


def served(client: redis.Redis, entity: str) -> np.void:
    prefix = client.get(pointer_key("ns", "emb")).decode()
    return np.frombuffer(client.get(f"{prefix}:e:{entity}"), dtype=EMB.record_dtype)[0]


def test_100k_rows_with_malformed_ones_report_exactly_and_rerun_idempotently(
    client: redis.Redis, big_file: tuple[Path, np.ndarray, dict[int, str]]
) -> None:
    path, vec, expected = big_file
    first = ingest(client, REGISTRY, "emb", path, namespace="ns", progress=False)
    assert first.rows_read == 100_000 + len(MALFORMED)
    assert first.rows_written == 100_000 - 1 + 1  # "i5" repeats: 100,000 good rows, one duplicate skipped
    assert [int(b.where.split()[1]) for b in first.bad_rows] == sorted(expected)
    for bad in first.bad_rows:
        assert expected[int(bad.where.split()[1])] in bad.reason, bad
    assert first.rate > 0 and first.prefix == "ns:mat:emb:1"
    assert served(client, "i99999")["vec"].tobytes() == vec[99_999].tobytes()
    keys = client.dbsize()
    assert keys == first.rows_written + 3  # + meta, pointer, sequence

    second = ingest(client, REGISTRY, "emb", path, namespace="ns", progress=False)
    assert (second.rows_read, second.rows_written) == (first.rows_read, first.rows_written)
    assert second.bad_rows == first.bad_rows
    assert second.previous_prefix == first.prefix and second.previous_removed == first.rows_written + 1
    assert client.dbsize() == keys
    for entity in ("i0", "i5", "i54321"):
        assert served(client, entity)["vec"].tobytes() == vec[int(entity[1:])].tobytes()


def test_a_failed_ingest_leaves_the_previous_materialization_serving(
    client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ok.csv"
    path.write_text(HEADER + "".join(f"i{i}," + "1," * 8 + "3\n" for i in range(25_000)))
    good = ingest(client, REGISTRY, "emb", path, namespace="ns", progress=False)
    keys = client.dbsize()

    # Redis fails part-way: two batches are already written when the third one breaks.
    real_write = ingest_module._write
    batches = iter(range(100))

    def failing_write(*args, **kwargs):
        if next(batches) == 2:
            raise redis.ConnectionError("connection lost")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "_write", failing_write)
    with pytest.raises(IngestError, match=f"still serves '{good.prefix}'"):
        ingest(client, REGISTRY, "emb", path, namespace="ns", progress=False, batch_rows=10_000)
    monkeypatch.undo()
    assert client.get(pointer_key("ns", "emb")) == good.prefix.encode()
    assert client.dbsize() == keys  # the half-written materialization was removed

    # Too many bad rows: refused before switching.
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "x,1\n" * 3 + "i1," + "2," * 8 + "4\n")
    with pytest.raises(IngestError, match="more than 2 bad rows"):
        ingest(client, REGISTRY, "emb", bad, namespace="ns", progress=False, max_bad_rows=2)
    # Nothing good at all: refused too.
    with pytest.raises(IngestError, match="no good rows"):
        ingest(client, REGISTRY, "emb", _only_bad(tmp_path), namespace="ns", progress=False)
    assert client.get(pointer_key("ns", "emb")) == good.prefix.encode() and client.dbsize() == keys
    assert served(client, "i7")["cat"] == 3


def _only_bad(tmp_path: Path) -> Path:
    path = tmp_path / "only-bad.csv"
    path.write_text(HEADER + "x,1\n")
    return path


def test_missing_columns_fail_before_anything_is_written(client: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("item_id,vec_0\ni1,1\n")
    with pytest.raises(IngestError, match="missing column"):
        ingest(client, REGISTRY, "emb", path, namespace="ns", progress=False)
    assert client.get(pointer_key("ns", "emb")) is None
    assert not list(client.scan_iter(match="ns:mat:*"))


def test_parquet_with_list_and_expanded_columns(client: redis.Redis, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vec = rng.standard_normal((5, 8)).astype(np.float32)
    as_list = pa.table(
        {
            "item_id": ["a", "b", None, "d", "e"],
            "vec": pa.array([list(v) for v in vec[:4]] + [[1.0] * 7], type=pa.list_(pa.float32())),
            "cat": pa.array([1, 2, 3, None, 5], type=pa.int64()),
            "other": [1, 2, 3, 4, 5],
        }
    )
    pq.write_table(as_list, tmp_path / "list.parquet")
    report = ingest(client, REGISTRY, "emb", tmp_path / "list.parquet", namespace="ns", progress=False)
    assert report.rows_written == 2 and report.ignored_columns == ["other"]
    assert [(b.where, b.reason) for b in report.bad_rows] == [
        ("row 3", "item_id is null"),
        ("row 4", "column 'cat' is null"),
        ("row 5", "column 'vec': expected a list of 8 values"),
    ]
    assert served(client, "b")["vec"].tobytes() == vec[1].tobytes()

    expanded = pa.table({"item_id": ["x"], **{f"vec_{i}": [float(vec[0, i])] for i in range(8)}, "cat": [7]})
    pq.write_table(expanded, tmp_path / "wide.parquet")
    report = ingest(client, REGISTRY, "emb", tmp_path / "wide.parquet", namespace="ns", progress=False)
    assert report.rows_written == 1 and served(client, "x")["cat"] == 7


def test_cli_ingest_reports_and_rebuilds_the_candidate_index(
    redis_url: str, client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(9)
    rows = "".join(
        f"i{i}," + ",".join(repr(float(v)) for v in rng.standard_normal(32).astype(np.float32)) + f",{i % 7},9.5\n"
        for i in range(300)
    )
    path = tmp_path / "items.csv"
    path.write_text("item_id," + ",".join(f"vec_{i}" for i in range(32)) + ",category,price\n" + rows + "bad\n")
    index, bad_out = tmp_path / "index" / "items.npz", tmp_path / "bad.tsv"
    code = infermesh(
        [
            "features",
            "ingest",
            str(path),
            "--view",
            "item",
            "--redis-url",
            redis_url,
            "--namespace",
            "cli",
            "--no-progress",
            "--index",
            str(index),
            "--bad-rows-out",
            str(bad_out),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "301 rows read, 300 written, 1 bad rows skipped" in out and "rows/s" in out
    assert "line 302: expected 35 fields, got 1" in out
    assert bad_out.read_text() == "line 302\texpected 35 fields, got 1\n"
    loaded = CandidateIndex.load(index)
    assert loaded.size == 300 and loaded.spec["view"] == "item"
    assert client.get(pointer_key("cli", "item")) == b"cli:mat:item:1"
    assert load_registry().views["item"].record_dtype.itemsize == len(client.get("cli:mat:item:1:i:i3"))

    code = infermesh(
        ["features", "ingest", str(tmp_path / "nope.csv"), "--view", "item", "--redis-url", redis_url, "--no-progress"]
    )
    assert code == 1 and "no such file" in capsys.readouterr().err
