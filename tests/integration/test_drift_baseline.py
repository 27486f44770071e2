"""`infermesh drift baseline`: the drift reference from the user's own feature file (Parquet
or CSV, columns by name) for a model with two named inputs (INT64 ids, FP32 dense); clear
errors naming the file and the column; and a real scoring server monitoring that model's
traffic against it (shifted dense features raise their PSI, the ids' stays low)."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infermesh.cli import main as infermesh
from infermesh.workload import modelgen
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.scoring.drift import DEFAULT_THRESHOLD, REFERENCE_NAME
from tests.scoring_server import running_scoring, server_settings
from tests.two_input_model import CATEGORIES, DENSE_COLUMNS, ID_COLUMNS, two_input_model

DENSE_NAMES = ["age", "price", "clicks_7d", "dwell_s", "recency_d", "popularity"]
ROWS = 3_000
REQUEST_ROWS = 200
# The monitor bins 32 rows of every 4th request and first reports at 1,000 binned rows.
REQUESTS = 160


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    modelgen.write_config(root, "two", {"max_batch_size": 256})
    modelgen.write_version(root, "two", 1, two_input_model())
    return root


def rows(seed: int, count: int, dense_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CATEGORIES, (count, ID_COLUMNS))
    dense = (rng.standard_normal((count, DENSE_COLUMNS)) + dense_shift).astype(np.float32)
    return ids, dense


def parquet_file(path: Path) -> Path:
    ids, dense = rows(1, ROWS)
    columns = {"user_id": [f"u{i}" for i in range(ROWS)], "ids": pa.array(list(ids), type=pa.list_(pa.int64()))}
    pq.write_table(pa.table(columns | {name: dense[:, i] for i, name in enumerate(DENSE_NAMES)}), path)
    return path


def csv_file(path: Path, edit: dict[str, str] | None = None, drop: str = "") -> Path:
    """ids_0, ids_1, dense_0 .. dense_5; `edit` overwrites cells of the third row, `drop` a column."""
    ids, dense = rows(2, 500)
    header = [f"ids_{i}" for i in range(ID_COLUMNS)] + [f"dense_{i}" for i in range(DENSE_COLUMNS)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [c for c in header if c != drop], extrasaction="ignore")
        writer.writeheader()
        for n, (id_row, dense_row) in enumerate(zip(ids, dense, strict=True)):
            record = dict(zip(header, [*id_row.tolist(), *dense_row.tolist()], strict=True))
            writer.writerow(record | (edit or {}) if n == 2 else record)
    return path


def baseline(repository: Path, data: Path, *extra: str) -> list[str]:
    return ["drift", "baseline", "--repository", str(repository), "--model", "two", "--data", str(data), *extra]


def test_parquet_with_named_columns(repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = parquet_file(tmp_path / "features.parquet")
    assert infermesh(baseline(repository, data, "--columns", f"dense={','.join(DENSE_NAMES)}")) == 0
    assert f"wrote {repository / 'two' / '1' / REFERENCE_NAME}" in capsys.readouterr().out
    reference = json.loads((repository / "two" / "1" / REFERENCE_NAME).read_text())
    assert reference["input"]["features"] == ["ids_0", "ids_1", *DENSE_NAMES]
    assert reference["model_inputs"] == [{"name": "ids", "width": 2}, {"name": "dense", "width": 6}]
    assert reference["rows"] == ROWS and reference["source"] == "features.parquet" and reference["bins"] == 10
    assert len(reference["prediction"]["cuts"]) == 9


def test_csv_with_numbered_columns_sampled(repository: Path, tmp_path: Path) -> None:
    data = csv_file(tmp_path / "features.csv")
    assert infermesh(baseline(repository, data, "--rows", "400", "--bins", "5")) == 0
    reference = json.loads((repository / "two" / "1" / REFERENCE_NAME).read_text())
    assert reference["input"]["features"] == ["ids_0", "ids_1", *(f"dense_{i}" for i in range(DENSE_COLUMNS))]
    assert reference["rows"] == 400 and reference["bins"] == 5


@pytest.mark.parametrize(
    ("edit", "drop", "columns", "message"),
    [
        (
            None,
            "dense_5",
            [],
            "no column for model input 'dense' (float32 x 6): expected a list column 'dense' of 6 or columns "
            "'dense_0'..'dense_5', or name them with --columns dense=COLUMN,...; the file has 'ids_0', 'ids_1', "
            "'dense_0', 'dense_1', 'dense_2', 'dense_3', 'dense_4'",
        ),
        ({"dense_2": "seven"}, "", [], "column 'dense_2' is string; model input 'dense' (float32 x 6) needs numbers"),
        (
            {"ids_1": "3.5"},
            "",
            [],
            "column 'ids_1' holds fractional values; model input 'ids' (int64 x 2) takes whole ids",
        ),
        (
            {"ids_0": "40"},
            "",
            [],
            "column 'ids_0' has ids outside [0, 40), the rows of the embedding table model input 'ids' indexes",
        ),
        ({"dense_4": ""}, "", [], "column 'dense_4' has 1 empty cell; model input 'dense' needs a value in every row"),
        (
            None,
            "",
            ["dense=dense_0,dense_1,dense_2,age"],
            "no column 'age' (--columns dense=...); the file has 'ids_0', 'ids_1', 'dense_0', 'dense_1', "
            "'dense_2', 'dense_3', 'dense_4', 'dense_5'",
        ),
        (
            None,
            "",
            ["dense=dense_0,dense_1"],
            "columns 'dense_0', 'dense_1' give 2 values per row; model input 'dense' (float32 x 6) needs 6",
        ),
    ],
)
def test_a_file_that_does_not_fit_the_model_names_the_file_and_column(
    repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: dict[str, str] | None,
    drop: str,
    columns: list[str],
    message: str,
) -> None:
    data = csv_file(tmp_path / "features.csv", edit, drop)
    extra = [arg for pair in columns for arg in ("--columns", pair)]
    assert infermesh(baseline(repository, data, *extra)) == 1
    assert capsys.readouterr().err == f"infermesh drift baseline: {data}: {message}\n"
    assert not (repository / "two" / "1" / REFERENCE_NAME).exists()


def test_no_file_and_an_unknown_input(repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.parquet"
    assert infermesh(baseline(repository, missing)) == 1
    assert capsys.readouterr().err == f"infermesh drift baseline: {missing}: no such file\n"
    data = csv_file(tmp_path / "features.csv")
    assert infermesh(baseline(repository, data, "--columns", "user=dense_0")) == 1
    assert capsys.readouterr().err == (
        "infermesh drift baseline: --columns names 'user', not an input of the model ('ids', 'dense')\n"
    )


def request(model: str, ids: np.ndarray, dense: np.ndarray) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="ids", datatype="INT64", shape=list(ids.shape))
    message.inputs.add(name="dense", datatype="FP32", shape=list(dense.shape))
    message.raw_input_contents.extend([ids.astype("<i8").tobytes(), dense.astype("<f4").tobytes()])
    return message


async def test_scoring_monitors_a_two_input_model_against_the_users_baseline(repository: Path, tmp_path: Path) -> None:
    data = parquet_file(tmp_path / "features.parquet")
    assert infermesh(baseline(repository, data, "--columns", f"dense={','.join(DENSE_NAMES)}")) == 0
    shutil.copytree(repository / "two", repository / "shifted")  # same model and reference, other traffic
    async with running_scoring(server_settings(repository)) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.settings.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for model, shift in (("two", 0.0), ("shifted", 2.0)):
                ids, dense = rows(7, REQUESTS * REQUEST_ROWS, dense_shift=shift)
                for start in range(0, len(ids), REQUEST_ROWS * 8):
                    await asyncio.gather(
                        *(
                            stub.ModelInfer(request(model, ids[s : s + REQUEST_ROWS], dense[s : s + REQUEST_ROWS]))
                            for s in range(start, start + REQUEST_ROWS * 8, REQUEST_ROWS)
                        )
                    )
        registry = service.metrics.registry

        def psi(model: str, feature: str) -> float:
            value = registry.get_sample_value(
                "scoring_input_drift_psi", {"model": model, "version": "1", "feature": feature}
            )
            assert value is not None, (model, feature)
            return value

        for feature in ("ids_0", "ids_1", *DENSE_NAMES):
            assert psi("two", feature) < DEFAULT_THRESHOLD
        for feature in DENSE_NAMES:
            assert psi("shifted", feature) > DEFAULT_THRESHOLD
        assert psi("shifted", "ids_0") < DEFAULT_THRESHOLD and psi("shifted", "ids_1") < DEFAULT_THRESHOLD
