"""An unmodified tritonclient.grpc (sync and aio) against `python -m services.scoring`.

The server runs as the mesh runs it (a subprocess configured by SCORING_* variables); the
client runs in its own interpreter (tests/e2e/scoring_tritonclient/suite.py) because
tritonclient's `inference.*` protobuf descriptors clash with ours in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.up.supervisor import free_port
from infermesh.workload import modelgen

SUITE = Path(__file__).with_name("scoring_tritonclient") / "suite.py"
ROOT = Path(__file__).resolve().parents[2]

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


def wait_serving(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if process.poll() is not None:
                raise AssertionError(f"scoring exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"scoring never became SERVING:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def scoring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("scoring")
    repository = build_repository(workdir / "models")
    port = free_port()
    env = {
        **os.environ,
        "SCORING_PORT": str(port),
        "SCORING_MODEL_REPOSITORY": str(repository),
        "SCORING_MODEL_CONTROL_MODE": "explicit",
        "SCORING_LOAD_MODELS": "ranker,add,typed",
        "SCORING_PROVIDERS": "cpu",
        "OTEL_TRACES_EXPORTER": "none",
        "LOG_LEVEL": "WARNING",
    }
    log = workdir / "scoring.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.scoring"], cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process, log)
        yield address, repository
    finally:
        process.terminate()
        process.wait(timeout=30)


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
