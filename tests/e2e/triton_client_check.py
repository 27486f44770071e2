"""Runs in its own interpreter: an unmodified tritonclient.grpc against the edge.

Kept apart from the test process because tritonclient registers its own `inference.*`
protobuf descriptors, which clash with ours in one process. Prints one JSON document.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(edge: str, model_path: str) -> None:
    client = triton.InferenceServerClient(edge)
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("ranker"),
    }
    metadata = client.get_model_metadata("ranker", as_json=True)
    report["metadata"] = metadata
    rows = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)
    tensor = triton.InferInput("features", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer("ranker", [tensor], outputs=[triton.InferRequestedOutput("score")])
    served = result.as_numpy("score")
    local = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, {"features": rows})[0]
    report["shape"] = list(served.shape)
    report["max_abs_diff"] = float(np.abs(served - local).max())
    report["model_version"] = result.get_response().model_version

    short = triton.InferInput("features", [100, 64], "FP32")
    short.set_data_from_numpy(rows[:100])
    short.set_shape([200, 64])  # now the bytes are half what the declared shape needs
    try:
        client.infer("ranker", [short])
        report["short_error"] = None
    except InferenceServerException as error:
        report["short_error"] = {"status": error.status(), "message": error.message()}
    try:
        client.get_model_metadata("no-such-model")
        report["unknown_model_error"] = None
    except InferenceServerException as error:
        report["unknown_model_error"] = {"status": error.status(), "message": error.message()}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
