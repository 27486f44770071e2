"""A Triton-style model repository (config.pbtxt, <model>/<version>/model.onnx) served as it is
by the real scoring process (`python -m services.scoring`, real ONNX Runtime), driven by an
unmodified tritonclient.grpc: dynamic_batching and version_policy from config.pbtxt take
effect, a field the server does not support is named in the load warning (log and
RepositoryIndex), and broken or mismatched config.pbtxt files fail their model's load with
the file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from infermesh.workload import modelgen
from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.genproto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.processes import running_service

CLIENT = Path(__file__).with_name("tritonclient_pbtxt.py")
ROWS = np.random.default_rng(7).standard_normal((5, 64)).astype(np.float32)

# As Triton's documentation writes them; line 10 (preserve_ordering) and the execution_mode
# parameter are what this server does not do.
RANKER = """\
name: "ranker"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "features", data_type: TYPE_FP32, dims: [ 64 ] } ]
output [ { name: "score", data_type: TYPE_FP32, dims: [ 1 ] } ]

dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 200
  preserve_ordering: true
}
instance_group [ { count: 2, kind: KIND_CPU } ]
version_policy: { specific: { versions: [ 1, 3 ] } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "execution_mode" value: { string_value: "0" } }
"""
ADD = """\
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "a" data_type: TYPE_INT64 dims: [ 4 ] },
  { name: "b" data_type: TYPE_INT64 dims: [ 4 ] }
]
output [
  { name: "sum" data_type: TYPE_INT64 dims: [ 4 ] },
  { name: "diff" data_type: TYPE_INT64 dims: [ 4 ] }
]
version_policy: { latest: { num_versions: 2 } }
"""
BROKEN = {
    "trt": ('name: "trt"\nplatform: "tensorrt_plan"\nmax_batch_size: 8\n', modelgen.mlp_model(1)),
    "typo": ("max_batch_size: 8\n\nmax_batch_sise: 8\n", modelgen.mlp_model(1)),
    "narrow": (
        'max_batch_size: 8\ninput [\n  {\n    name: "features"\n    data_type: TYPE_FP32\n    dims: [ 32 ]\n  }\n]\n',
        modelgen.mlp_model(1),
    ),
}


def build_repository(root: Path) -> Path:
    """Laid out for Triton: <model>/config.pbtxt and <model>/<version>/model.onnx."""
    for version in (1, 2, 3):
        modelgen.write_version(root, "ranker", version, modelgen.mlp_model(version))
    (root / "ranker" / "config.pbtxt").write_text(RANKER)
    for version in (1, 2):
        modelgen.write_version(root, "add", version, modelgen.int64_add_model())
    (root / "add" / "config.pbtxt").write_text(ADD)
    # Both files: config.json wins, and the config.pbtxt is reported as ignored.
    modelgen.write_version(root, "both", 1, modelgen.mlp_model(1))
    modelgen.write_config(root, "both", {"max_batch_size": 4})
    (root / "both" / "config.pbtxt").write_text("max_batch_size: 32\n")
    for name, (config, model) in BROKEN.items():
        modelgen.write_version(root, name, 1, model)
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module")
def scoring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    workdir = tmp_path_factory.mktemp("pbtxt")
    repository = build_repository(workdir / "models")
    env = {
        "SCORING_MODEL_REPOSITORY": str(repository),
        # The broken models load only when asked (their errors are the load requests' answers).
        "SCORING_MODEL_CONTROL_MODE": "explicit",
        "SCORING_LOAD_MODELS": "ranker,add,both",
        "SCORING_PROVIDERS": "cpu",
        "LOG_LEVEL": "WARNING",
    }
    log = workdir / "scoring.log"
    with running_service("scoring", env, log) as service:
        yield service.address, repository, log


@pytest.fixture(scope="module")
def tritonclient_report(scoring: tuple[str, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    rows = tmp_path_factory.mktemp("rows") / "rows.npy"
    np.save(rows, ROWS)
    completed = subprocess.run(
        [sys.executable, str(CLIENT), scoring[0], str(rows)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def reference(repository: Path, version: int) -> list[float]:
    session = ort.InferenceSession(
        str(repository / "ranker" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"features": ROWS})[0].ravel().tolist()


def test_tritonclient_infers_on_the_versions_config_pbtxt_selects(
    scoring: tuple[str, Path, Path], tritonclient_report: dict
) -> None:
    report, repository = tritonclient_report, scoring[1]
    # version_policy specific [1, 3]: 3 is the newest served, 2 is not loaded at all.
    assert report["ranker_vlatest"]["version"] == "3"
    assert np.allclose(report["ranker_vlatest"]["scores"], reference(repository, 3), atol=1e-6)
    assert report["ranker_v1"]["version"] == "1"
    assert np.allclose(report["ranker_v1"]["scores"], reference(repository, 1), atol=1e-6)
    status, message = report["ranker_v2"]
    assert status == "StatusCode.NOT_FOUND" and "no ready version '2'" in message
    # latest { num_versions: 2 }: both versions of `add`, two INT64 inputs.
    assert report["add"] == {"version": "2", "sum_ok": True, "diff_ok": True, "ready": [True, True]}


def test_model_config_answers_what_config_pbtxt_said(tritonclient_report: dict) -> None:
    assert tritonclient_report["ranker_config"] == {
        "max_batch_size": 16,
        "preferred_batch_size": [4, 8],
        "max_queue_delay_microseconds": 200,
        "version_policy": "specific",
        "specific_versions": [1, 3],
        "latest_versions": 0,
        "instance_group": [[2, "KIND_CPU"]],
        "input": [["features", "TYPE_FP32", [64]]],
        "output": [["score", "TYPE_FP32", [1]]],
    }
    add = tritonclient_report["add_config"]
    assert (add["version_policy"], add["latest_versions"], add["max_batch_size"]) == ("latest", 2, 8)
    assert add["input"] == [["a", "TYPE_INT64", [4]], ["b", "TYPE_INT64", [4]]]
    # config.json wins over the config.pbtxt beside it.
    assert tritonclient_report["both_config"]["max_batch_size"] == 4


def test_unsupported_fields_are_named_in_the_load_warning(scoring: tuple[str, Path, Path]) -> None:
    address, _, log = scoring
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    reasons = {(m.name, m.version): (m.state, m.reason) for m in reply.models}
    ignored = (
        "ranker/config.pbtxt: not supported, ignored: dynamic_batching.preserve_ordering (line 10), "
        'parameters["execution_mode"] (line 15)'
    )
    for version in ("1", "3"):
        assert reasons["ranker", version] == ("READY", f"CPUExecutionProvider: CPU requested; {ignored}")
    assert ("ranker", "2") not in reasons
    assert reasons["add", "2"] == ("READY", "CPUExecutionProvider: CPU requested")
    assert reasons["both", "1"][1].endswith("both/config.pbtxt ignored: config.json takes precedence over it")
    warnings = [json.loads(line) for line in log.read_text().splitlines() if "does not do" in line]
    logged = {(w["model"], w["version"], w["level"]) for w in warnings}
    assert logged >= {("ranker", 1, "warning"), ("ranker", 3, "warning")}
    assert all(w["warnings"] == ignored for w in warnings if w["model"] == "ranker")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            "trt",
            "trt/config.pbtxt:2: platform: platform 'tensorrt_plan' is not supported: this server runs ONNX models "
            "(platform 'onnxruntime_onnx')",
        ),
        ("typo", 'typo/config.pbtxt:3:1: Message type "inference.ModelConfig" has no field named "max_batch_sise".'),
        (
            "narrow",
            "narrow/config.pbtxt:6: input[0]: 'features' has shape [-1, 32] in the config (the batch dimension first, "
            "as max_batch_size > 0), but 1/model.onnx expects [-1, 64] (-1 = any size)",
        ),
    ],
)
def test_a_config_pbtxt_at_odds_fails_its_load_naming_file_line_and_field(
    scoring: tuple[str, Path, Path], model: str, message: str
) -> None:
    with grpc.insecure_channel(scoring[0]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=60)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        still_ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    rows = [(m.state, m.reason) for m in index.models if m.name == model]
    assert rows and all(state == "UNAVAILABLE" and message in reason for state, reason in rows)
    assert still_ready  # a failed load request leaves the served models serving
