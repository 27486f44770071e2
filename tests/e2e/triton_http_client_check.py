"""Runs in its own interpreter: an unmodified tritonclient.http against the edge, next to
tritonclient.grpc for the same inferences. Prints one JSON document of what it saw.

Kept apart from the test process, like triton_client_check.py: tritonclient.grpc registers
its own `inference.*` protobuf descriptors, which clash with the services' own.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

MODEL = "ranker"


def error_of(call: Any) -> dict[str, Any] | None:
    try:
        call()
    except InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return None


def http_scores(client: triton_http.InferenceServerClient, rows: np.ndarray, binary: bool, **options: Any) -> Any:
    tensor = triton_http.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    output = triton_http.InferRequestedOutput("score", binary_data=binary)
    return client.infer(MODEL, [tensor], outputs=[output], **options)


def grpc_scores(edge: str, rows: np.ndarray) -> np.ndarray:
    client = triton_grpc.InferenceServerClient(edge)
    tensor = triton_grpc.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return client.infer(MODEL, [tensor]).as_numpy("score")


def main(edge: str) -> None:
    client = triton_http.InferenceServerClient(edge)
    report: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(MODEL),
        "model_metadata_v1": client.get_model_metadata(MODEL, model_version="1"),
        "model_ready": client.is_model_ready(MODEL),
        "model_ready_v1": client.is_model_ready(MODEL, model_version="1"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
    }
    rows = np.random.default_rng(3).standard_normal((200, 64)).astype(np.float32)
    by_grpc = grpc_scores(edge, rows)
    json_result = http_scores(client, rows, binary=False, request_id="json-1")
    binary_result = http_scores(client, rows, binary=True, model_version="1")
    compressed = http_scores(
        client, rows, binary=True, request_compression_algorithm="gzip", response_compression_algorithm="gzip"
    )
    # No outputs named: tritonclient asks for every output as binary data (binary_data_output).
    everything = triton_http.InferInput("features", list(rows.shape), "FP32")
    everything.set_data_from_numpy(rows)
    default_result = client.infer(MODEL, [everything])
    report["infer"] = {
        name: {
            "shape": list(result.as_numpy("score").shape),
            "max_abs_diff_to_grpc": float(np.abs(result.as_numpy("score") - by_grpc).max()),
            "response": result.get_response(),
        }
        for name, result in (
            ("json", json_result),
            ("binary", binary_result),
            ("compressed", compressed),
            ("default", default_result),
        )
    }

    short = triton_http.InferInput("features", [100, 64], "FP32")
    short.set_data_from_numpy(rows[:100])
    short.set_shape([200, 64])  # now the bytes are half what the declared shape needs
    report["short_binary_error"] = error_of(lambda: client.infer(MODEL, [short]))
    wrong = triton_http.InferInput("features", [2, 64], "INT64")
    wrong.set_data_from_numpy(np.zeros((2, 64), np.int64), binary_data=False)
    report["wrong_datatype_error"] = error_of(lambda: client.infer(MODEL, [wrong]))
    report["unknown_model_metadata_error"] = error_of(lambda: client.get_model_metadata("no-such-model"))
    tensor = triton_http.InferInput("features", [2, 64], "FP32")
    tensor.set_data_from_numpy(rows[:2])
    report["unknown_model_infer_error"] = error_of(lambda: client.infer("no-such-model", [tensor]))
    report["unknown_version_error"] = error_of(lambda: client.infer(MODEL, [tensor], model_version="99"))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
