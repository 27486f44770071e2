"""An unmodified tritonclient.grpc against a scoring server that serves a Triton-style
repository (config.pbtxt): run in its own interpreter, because tritonclient registers its own
`inference.*` protobuf descriptors, which clash with ours in one process.

    python tritonclient_pbtxt.py HOST:PORT ROWS.npy

Prints one JSON object: what the server answered (tests/integration/test_scoring_pbtxt.py
asserts on it).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException


def tensor(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    value = triton.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def model_config(client: triton.InferenceServerClient, model: str) -> dict[str, Any]:
    config = client.get_model_config(model).config
    return {
        "max_batch_size": config.max_batch_size,
        "preferred_batch_size": list(config.dynamic_batching.preferred_batch_size),
        "max_queue_delay_microseconds": config.dynamic_batching.max_queue_delay_microseconds,
        "version_policy": config.version_policy.WhichOneof("policy_choice"),
        "specific_versions": list(config.version_policy.specific.versions),
        "latest_versions": config.version_policy.latest.num_versions,
        "instance_group": [
            [g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)] for g in config.instance_group
        ],
        "input": [[t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)] for t in config.input],
        "output": [[t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)] for t in config.output],
    }


def main(address: str, rows_file: str) -> dict[str, Any]:
    client = triton.InferenceServerClient(address)
    rows = np.load(rows_file)
    report: dict[str, Any] = {f"{model}_config": model_config(client, model) for model in ("ranker", "add", "both")}
    for version in ("", "1"):
        result = client.infer("ranker", [tensor("features", rows, "FP32")], model_version=version)
        report[f"ranker_v{version or 'latest'}"] = {
            "version": result.get_response().model_version,
            "scores": result.as_numpy("score").ravel().tolist(),
        }
    try:
        client.infer("ranker", [tensor("features", rows, "FP32")], model_version="2")
        report["ranker_v2"] = "answered"
    except InferenceServerException as error:
        report["ranker_v2"] = [error.status(), error.message()]
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    b = np.full((3, 4), 2**40, dtype=np.int64)
    added = client.infer("add", [tensor("a", a, "INT64"), tensor("b", b, "INT64")])
    report["add"] = {
        "version": added.get_response().model_version,
        "sum_ok": bool(np.array_equal(added.as_numpy("sum"), a + b)),
        "diff_ok": bool(np.array_equal(added.as_numpy("diff"), a - b)),
        "ready": [client.is_model_ready("add", version) for version in ("1", "2")],
    }
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
