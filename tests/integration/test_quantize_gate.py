"""`infermesh models quantize` on a model unlike the demo's (INT64 ids through an embedding
table plus FP32 dense features), real ONNX Runtime quantization: rows per named input,
generated or read from the user's file, and a quality gate that passes a good int8 model
at the default --max-ndcg-drop and rejects a damaged one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infermesh.cli import main as infermesh
from infermesh.workload import modelgen
from tests.two_input_model import CATEGORIES, DENSE_COLUMNS, ID_COLUMNS, two_input_model

DENSE_NAMES = ["age", "price", "clicks_7d", "dwell_s", "recency_d", "popularity"]
ROWS = 2_000


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    modelgen.write_config(tmp_path / "models", "two", {"max_batch_size": 256})
    modelgen.write_version(tmp_path / "models", "two", 1, two_input_model())
    return tmp_path / "models"


def quantize(repository: Path, *extra: str) -> list[str]:
    return [
        "models",
        "quantize",
        "--repository",
        str(repository),
        "--model",
        "two",
        "--queries",
        "50",
        "--seconds",
        "0.05",
        *extra,
    ]


def feature_file(path: Path, dense_scale: float = 1.0) -> Path:
    """Parquet as a user keeps features: ids in a list column, dense features by name, a label."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, CATEGORIES, (ROWS, ID_COLUMNS))
    dense = rng.standard_normal((ROWS, DENSE_COLUMNS)) * dense_scale
    columns = {"ids": pa.array(list(ids), type=pa.list_(pa.int64()))}
    columns |= {name: dense[:, i] for i, name in enumerate(DENSE_NAMES)}
    columns["clicked"] = (rng.random(ROWS) < 0.3).astype(np.int64)
    pq.write_table(pa.table(columns), path)
    return path


def test_a_good_int8_model_passes_the_default_gate_and_serves_both_inputs(
    repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert infermesh([*quantize(repository), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == {"ids": "int64 x 2", "dense": "float32 x 6"}
    assert report["max_ndcg_drop"] == 0.01 and report["accepted"] and report["new_version"] == 2
    assert report["ndcg_drop"] <= 0.01 and report["float"]["ndcg_at_20"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    feed = {
        "ids": rng.integers(0, CATEGORIES, (16, ID_COLUMNS)),
        "dense": rng.standard_normal((16, DENSE_COLUMNS)).astype(np.float32),
    }
    int8 = ort.InferenceSession(str(repository / "two" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    float_model = ort.InferenceSession(two_input_model(), providers=["CPUExecutionProvider"])
    assert np.allclose(int8.run(None, feed)[0], float_model.run(None, feed)[0], atol=0.1)


def test_static_quantization_calibrated_on_the_wrong_rows_is_rejected(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibrated on dense features 100x smaller than the traffic (say, before a unit change):
    activations clip, the ranking breaks, and nothing is published."""
    data = feature_file(tmp_path / "features.parquet")
    broken = feature_file(tmp_path / "calibration.parquet", dense_scale=0.01)
    named = ["--data", str(data), "--columns", f"dense={','.join(DENSE_NAMES)}", "--method", "static"]
    assert infermesh([*quantize(repository), *named, "--calibration", str(broken), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert not report["accepted"] and report["new_version"] is None and report["ndcg_drop"] > 0.05
    assert re.fullmatch(
        r"infermesh models quantize: NOT published: NDCG@20 dropped by 0\.\d{5} \(1\.00000 -> 0\.\d{5}\), "
        r"beyond --max-ndcg-drop 0\.01\n",
        captured.err,
    )
    assert not (repository / "two" / "2").exists()
    # The same method calibrated on rows like the traffic passes the same gate.
    assert infermesh([*quantize(repository), *named]) == 0
    assert (repository / "two" / "2" / "model.onnx").is_file()
    assert json.loads((repository / "two" / "2" / "quantized.json").read_text())["method"].startswith(
        "onnxruntime static int8"
    )


def test_the_users_label_is_the_gain(repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = feature_file(tmp_path / "features.parquet")
    columns = f"dense={','.join(DENSE_NAMES)}"
    argv = [*quantize(repository), "--data", str(data), "--columns", columns, "--label", "clicked", "--dry-run"]
    assert infermesh([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gains"] == "label 'clicked'" and report["rows"] == str(data)
    assert 0 < report["float"]["ndcg_at_20"] < 1  # an untrained model does not rank clicks perfectly
    assert abs(report["ndcg_drop"]) <= 0.01 and not (repository / "two" / "2").exists()


def test_a_file_without_the_models_columns_is_named_in_the_error(
    repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = feature_file(tmp_path / "features.parquet")
    assert infermesh([*quantize(repository), "--data", str(data)]) == 1
    assert capsys.readouterr().err == (
        f"infermesh models quantize: {data}: no column for model input 'dense' (float32 x 6): expected a list "
        "column 'dense' of 6 or columns 'dense_0'..'dense_5', or name them with --columns dense=COLUMN,...; "
        "the file has 'ids', 'age', 'price', 'clicks_7d', 'dwell_s', 'recency_d', 'popularity', 'clicked'\n"
    )
