"""An unmodified tritonclient.grpc (sync and aio) against `python -m services.scoring`.

The server runs as the mesh runs it (a subprocess configured by SCORING_* variables); the
client runs in its own interpreter (tests/e2e/scoring_tritonclient/suite.py) because
tritonclient's `inference.*` protobuf descriptors clash with ours in one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infermesh.workload import modelgen
from tests.processes import running_service

SUITE = Path(__file__).with_name("scoring_tritonclient") / "suite.py"

SYNC_CHECKS = {
    "health",
    "server_metadata",
    "model_metadata",
    "model_config",
    "fp32_raw",
    "int64_raw",
    "typed_contents",
    "other_datatypes",
    "request_parameters",
    "wrong_shape",
    "wrong_datatype",
    "wrong_byte_length",
    "unknown_model_and_version",
    "load_and_unload",
    "statistics",
    "async_infer_callback",
    "stream_infer",
}
AIO_CHECKS = {
    "aio_health_and_metadata",
    "aio_model_config",
    "aio_concurrent_fp32_and_int64",
    "aio_errors",
    "aio_load_unload_and_statistics",
    "aio_stream_infer",
}
# Tensors stated in config.json (shapes with the batch dimension), for ModelConfig to echo.
RANKER_TENSORS = {
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
}
ADD_TENSORS = {
    "inputs": [
        {"name": "a", "datatype": "INT64", "shape": [-1, 4]},
        {"name": "b", "datatype": "INT64", "shape": [-1, 4]},
    ],
    "outputs": [
        {"name": "sum", "datatype": "INT64", "shape": [-1, 4]},
        {"name": "diff", "datatype": "INT64", "shape": [-1, 4]},
    ],
}


def build_repository(root: Path) -> Path:
    modelgen.write_config(
        root,
        "ranker",
        {"max_batch_size": 1024, "dynamic_batching": {"max_queue_delay_microseconds": 1000}, **RANKER_TENSORS},
    )
    modelgen.write_version(root, "ranker", 1, modelgen.mlp_model(1))
    modelgen.write_config(root, "add", {"max_batch_size": 64, **ADD_TENSORS})
    modelgen.write_version(root, "add", 1, modelgen.int64_add_model())
    modelgen.write_config(root, "typed", {"max_batch_size": 16})
    modelgen.write_version(root, "typed", 1, modelgen.typed_model())
    modelgen.write_config(root, "spare", {"max_batch_size": 8})
    for version in (1, 2):
        modelgen.write_version(root, "spare", version, modelgen.mlp_model(100 + version))
    modelgen.write_version(root, "corrupt", 1, modelgen.CORRUPT_MODEL)
    return root


@pytest.fixture(scope="module")
def scoring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("scoring")
    repository = build_repository(workdir / "models")
    env = {
        "SCORING_MODEL_REPOSITORY": str(repository),
        "SCORING_MODEL_CONTROL_MODE": "explicit",
        "SCORING_LOAD_MODELS": "ranker,add,typed",
        "SCORING_PROVIDERS": "cpu",
        "LOG_LEVEL": "WARNING",
    }
    with running_service("scoring", env, workdir / "scoring.log") as service:
        yield service.address, repository


def run_suite(mode: str, address: str, repository: Path) -> dict[str, str | None]:
    completed = subprocess.run(
        [sys.executable, str(SUITE), mode, address, str(repository)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def test_tritonclient_sync(scoring: tuple[str, Path]) -> None:
    report = run_suite("sync", *scoring)
    assert set(report) == SYNC_CHECKS
    assert {name: problem for name, problem in report.items() if problem} == {}


def test_tritonclient_aio(scoring: tuple[str, Path]) -> None:
    report = run_suite("aio", *scoring)
    assert set(report) == AIO_CHECKS
    assert {name: problem for name, problem in report.items() if problem} == {}
