"""The Open Inference Protocol over HTTP/REST at the edge, as `infermesh up` runs it: real
Envoy, real scoring replicas (ONNX Runtime, the reference ranker), driven by an unmodified
tritonclient.http (health, metadata, inference with JSON and with binary tensors, errors)
whose scores must equal those of the gRPC path, and by plain HTTP requests as curl sends them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infermesh.envoy import MAX_REQUEST_BYTES
from infermesh.up.supervisor import Mesh
from services.scoring.models import PLATFORM

CHECK = Path(__file__).with_name("triton_http_client_check.py")
RANKER_METADATA = {
    "name": "ranker",
    "versions": ["1"],
    "platform": PLATFORM,
    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
}


def request(
    edge: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request to the edge."""
    call = urllib.request.Request(f"http://{edge}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def edge(mesh: Mesh) -> str:
    address = f"127.0.0.1:{mesh.topology.edge_port}"
    # `up` waits for every replica's gRPC health; Envoy checks scoring's HTTP port on its own,
    # every second: wait for that check to pass too.
    deadline = time.monotonic() + 30
    while request(address, "GET", "/v2/health/ready")[0] != 200:
        assert time.monotonic() < deadline, "scoring_http never became healthy behind the edge"
        time.sleep(0.2)
    return address


@pytest.fixture(scope="module")
def report(edge: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(CHECK), edge], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# ---- tritonclient.http ----------------------------------------------------------------------


def test_tritonclient_health_and_metadata(report: dict[str, Any]) -> None:
    assert report["live"] is True and report["ready"] is True
    assert report["model_ready"] is True and report["model_ready_v1"] is True
    assert report["unknown_model_ready"] is False
    server = report["server_metadata"]
    assert server["name"] == "infermesh" and "binary_tensor_data" in server["extensions"]
    assert report["model_metadata"] == report["model_metadata_v1"] == RANKER_METADATA


def test_tritonclient_inference_equals_the_grpc_path(report: dict[str, Any]) -> None:
    assert set(report["infer"]) == {"json", "binary", "compressed", "default"}
    for name, result in report["infer"].items():
        assert result["shape"] == [200, 1], name
        # One model, one batch of the same 200 rows: the same scores, to the bit.
        assert result["max_abs_diff_to_grpc"] == 0.0, name
        response = result["response"]
        assert (response["model_name"], response["model_version"]) == ("ranker", "1"), name
    (json_output,) = report["infer"]["json"]["response"]["outputs"]
    assert report["infer"]["json"]["response"]["id"] == "json-1"
    assert len(json_output["data"]) == 200 and "parameters" not in json_output
    for name in ("binary", "compressed", "default"):
        (output,) = report["infer"][name]["response"]["outputs"]
        assert output["parameters"] == {"binary_data_size": 200 * 4} and "data" not in output, name


def test_tritonclient_bad_input_is_400_unknown_model_404(report: dict[str, Any]) -> None:
    assert report["short_binary_error"] == {
        "status": "400",
        "message": "input 'features': 25600 bytes of binary data, but shape [200, 64] of FP32 needs 51200",
    }
    assert report["wrong_datatype_error"] == {
        "status": "400",
        "message": "input 'features': datatype INT64 does not match the model's FP32",
    }
    for case in ("unknown_model_metadata_error", "unknown_model_infer_error"):
        error = report[case]
        assert error["status"] == "404" and "model 'no-such-model'" in error["message"], case
    assert report["unknown_version_error"]["status"] == "404"


# ---- plain HTTP, as curl sends it -------------------------------------------------------------


def test_health_answers_with_the_status_alone(edge: str) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ranker/ready"):
        status, _, body = request(edge, "GET", path)
        assert (status, body) == (200, b""), path
    status, _, body = request(edge, "GET", "/v2/models/no-such-model/ready")
    assert (status, body) == (400, b"")


def test_json_inference_without_any_client_library(edge: str) -> None:
    rows = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    body = {
        "id": "curl-1",
        "inputs": [{"name": "features", "shape": [2, 64], "datatype": "FP32", "data": rows.tolist()}],
    }
    status, headers, reply = request(
        edge, "POST", "/v2/models/ranker/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and headers["content-type"] == "application/json"
    document = json.loads(reply)
    assert (document["model_name"], document["model_version"], document["id"]) == ("ranker", "1", "curl-1")
    (output,) = document["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("score", "FP32", [2, 1])
    assert all(0.0 <= score <= 1.0 for score in output["data"])


def test_errors_are_the_protocols_error_object(edge: str) -> None:
    cases = [
        ("GET", "/v2/models/no-such-model", None, 404, "unknown model 'no-such-model'"),
        ("POST", "/v2/models/ranker/infer", b"{not json", 400, "the inference request is not valid JSON"),
        ("GET", "/v2/models/ranker/stats", None, 404, "no such endpoint; the Open Inference Protocol's HTTP endpoints"),
        ("GET", "/v2/models/ranker/infer", None, 405, "method 'GET' is not allowed here; use POST"),
        # Over the edge's request limit: Envoy's own reply, in the protocol's shape all the same.
        ("POST", "/v2/models/ranker/infer", b" " * (MAX_REQUEST_BYTES + 1), 413, "Payload Too Large"),
    ]
    for method, path, body, expected_status, message in cases:
        status, headers, reply = request(edge, method, path, body)
        assert status == expected_status, (method, path, reply[:200])
        assert headers["content-type"] == "application/json", (method, path)
        (error,) = json.loads(reply).values()
        assert error.startswith(message), (method, path, error)
        assert list(json.loads(reply)) == ["error"]
