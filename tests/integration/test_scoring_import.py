"""`infermesh models import`: scikit-learn and LightGBM models become ONNX versions that the
real server serves with the original's predictions."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import joblib
import lightgbm
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from infermesh.cli import main as infermesh
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.scoring_server import running_scoring, server_settings

FEATURES = 8


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rows = np.random.default_rng(0).standard_normal((400, FEATURES)).astype(np.float32)
    return rows, (rows[:, 0] + 0.5 * rows[:, 1] > 0).astype(int)


@pytest.fixture
def logreg(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> Path:
    """A fitted scikit-learn logistic regression, dumped as `models import` takes it."""
    rows, labels = data
    joblib.dump(LogisticRegression().fit(rows, labels), tmp_path / "clf.joblib")
    return tmp_path / "clf.joblib"


def infer_request(model: str, rows: np.ndarray, output: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
    request.outputs.add(name=output)
    request.raw_input_contents.append(rows.tobytes())
    return request


async def test_imported_models_serve_the_original_predictions(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    rows, labels = data
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(rows, labels)
    joblib.dump(pipeline, tmp_path / "clf.joblib")
    booster = lightgbm.train(
        {"objective": "binary", "verbose": -1, "num_leaves": 8}, lightgbm.Dataset(rows, labels), 20
    )
    booster.save_model(str(tmp_path / "gbm.txt"))
    repository = tmp_path / "models"
    np.save(tmp_path / "sample.npy", rows[:64])
    for source, name in (("clf.joblib", "clf"), ("gbm.txt", "gbm")):
        code = infermesh(
            [
                "models",
                "import",
                str(tmp_path / source),
                "--model",
                name,
                "--repository",
                str(repository),
                "--sample",
                str(tmp_path / "sample.npy"),
                "--owner",
                "ranking-team",
                "--training-data-digest",
                "sha256:feed",
                "--source-revision",
                "9f1c2e",
            ]
        )
        assert code == 0

    probe = rows[100:140]
    async with running_scoring(server_settings(repository)) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.settings.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            clf = await stub.ModelInfer(infer_request("clf", probe, "probabilities"))
            gbm = await stub.ModelInfer(infer_request("gbm", probe, "probabilities"))
            labels_reply = await stub.ModelInfer(infer_request("gbm", probe, "label"))
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="gbm"))
            config = await stub.ModelConfig(pb.ModelConfigRequest(name="gbm"))
    # Provenance: what the import was told and what it found, in ModelMetadata and ModelConfig.
    provenance = dict(metadata.provenance)
    assert {k: provenance[k] for k in ("owner", "training_data_digest", "source_revision")} == {
        "owner": "ranking-team",
        "training_data_digest": "sha256:feed",
        "source_revision": "9f1c2e",
    }
    assert provenance["source_file"] == str(tmp_path / "gbm.txt") and provenance["converter"]
    assert provenance["source_sha256"] == hashlib.sha256((tmp_path / "gbm.txt").read_bytes()).hexdigest()
    assert {k: v.string_value for k, v in config.config.parameters.items()} == provenance
    clf_served = np.frombuffer(clf.raw_output_contents[0], np.float32).reshape(-1, 2)
    gbm_served = np.frombuffer(gbm.raw_output_contents[0], np.float32).reshape(-1, 2)
    assert np.allclose(clf_served, pipeline.predict_proba(probe), atol=1e-5)
    assert np.allclose(gbm_served[:, 1], booster.predict(probe), atol=1e-5)
    assert labels_reply.outputs[0].datatype == "INT64" and list(labels_reply.outputs[0].shape) == [len(probe)]


def test_import_refuses_a_file_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.pkl").write_text("not a model")
    assert (
        infermesh(["models", "import", str(tmp_path / "notes.pkl"), "--model", "x", "--repository", str(tmp_path)]) == 1
    )
    assert "not a joblib/pickle model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_import_refuses_a_model_name_that_is_not_one_directory(
    tmp_path: Path, logreg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repo"
    for name in ("../escape", "a/b", "", ".."):
        with pytest.raises(SystemExit) as exited:  # argparse's usage error, before any work
            infermesh(["models", "import", str(logreg), "--model", name, "--repository", str(repository)])
        assert exited.value.code == 2
    assert "is not a model name" in capsys.readouterr().err
    assert not repository.exists() and not (tmp_path / "escape").exists()


def test_import_refuses_a_model_that_does_not_fit_the_existing_config(
    tmp_path: Path, logreg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reference ranker: config.json declares input `features` and output `score`.
    from infermesh.workload import modelgen

    repository = tmp_path / "repo"
    modelgen.write_config(
        repository,
        "ranker",
        {
            "max_batch_size": 256,
            "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}],
            "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": [1]}],
        },
    )
    modelgen.write_version(repository, "ranker", 1, modelgen.mlp_model(0))
    code = infermesh(["models", "import", str(logreg), "--model", "ranker", "--repository", str(repository)])
    assert code == 1
    err = capsys.readouterr().err
    assert "exists with outputs ['score']" in err and "another --model name" in err
    assert sorted(p.name for p in (repository / "ranker").iterdir()) == ["1", "config.json"]


def test_import_of_a_missing_file_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for source in (tmp_path / "nope.joblib", tmp_path):  # missing; a directory
        assert infermesh(["models", "import", str(source), "--model", "x", "--repository", str(tmp_path / "r")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("infermesh models import: [Errno") and str(source) in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_quantize_refuses_what_it_cannot_quantize_in_one_line(
    tmp_path: Path, logreg: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "repo"
    assert infermesh(["models", "import", str(logreg), "--model", "lr", "--repository", str(repository)]) == 0
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.onnx").write_bytes(
        (repository / "lr" / "1" / "model.onnx").read_bytes()[:300]
    )
    capsys.readouterr()
    quantize = ["models", "quantize", "--repository", str(repository), "--queries", "5", "--seconds", "0.1", "--model"]
    for model, says in (("lr", "quantizer cannot quantize"), ("broken", "is not an ONNX model")):
        assert infermesh([*quantize, model]) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    assert sorted(p.name for p in (repository / "lr").iterdir() if p.is_dir()) == ["1"]  # nothing published
