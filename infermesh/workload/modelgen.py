"""Small ONNX models built with onnx.helper, and repository writing helpers.

Used by the tests (one model per datatype the protocol carries), the benchmark (the
reference MLP's architecture when no trained model is at hand) and the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from infermesh.workload.model import IR_VERSION, OPSET, MlpWeights, atomic_write_bytes, build_onnx, write_if_changed
from services.scoring.config import CONFIG_FILE, MODEL_FILE, PROVENANCE_FILE

_F32 = np.float32


def mlp_weights(seed: int) -> MlpWeights:
    """Untrained weights of the reference ranker's shape (64 -> 256 -> 128 -> 1)."""
    rng = np.random.default_rng(seed)

    def layer(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(_F32)

    return MlpWeights(
        w1=layer(64, 256),
        b1=np.zeros(256, _F32),
        w2=layer(256, 128),
        b2=np.zeros(128, _F32),
        w3=layer(128, 1),
        b3=np.zeros(1, _F32),
    )


def mlp_model(seed: int = 0) -> bytes:
    """The reference ranker's graph (input `features` FP32 [-1, 64], output `score` [-1, 1])."""
    return build_onnx(mlp_weights(seed)).SerializeToString()


def linear_model(seed: int = 0) -> bytes:
    """The reference ranker's input and output (`features` FP32 [-1, 64] -> `score` [-1, 1])
    through one 64 -> 1 layer: ~1/770 of the MLP's multiply-adds, so a server running it
    costs what serving costs (`models bench --overhead`)."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [64, 1], mlp_weights(seed).w3[:64].ravel())
    return _model(
        [
            helper.make_node("Constant", [], ["w"], value=weights),
            helper.make_node("MatMul", ["features", "w"], ["score"]),
        ],
        [_value("features", TensorProto.FLOAT, ["batch", 64])],
        [_value("score", TensorProto.FLOAT, ["batch", 1])],
        "linear",
    )


def _model(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _value(name: str, kind: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


def int64_add_model(width: int = 4) -> bytes:
    """sum = a + b, diff = a - b; INT64 [-1, width]."""
    return _model(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        [_value("a", TensorProto.INT64, ["batch", width]), _value("b", TensorProto.INT64, ["batch", width])],
        [_value("sum", TensorProto.INT64, ["batch", width]), _value("diff", TensorProto.INT64, ["batch", width])],
        "int64_add",
    )


def typed_model(width: int = 4) -> bytes:
    """One input and output per datatype: INT32 +1, FP16 *2, BOOL not, BYTES identity."""
    one = helper.make_tensor("one", TensorProto.INT32, [], [1])
    two = helper.make_tensor("two", TensorProto.FLOAT16, [], [2.0])
    nodes = [
        helper.make_node("Constant", [], ["one"], value=one),
        helper.make_node("Constant", [], ["two"], value=two),
        helper.make_node("Add", ["i32", "one"], ["i32_out"]),
        helper.make_node("Mul", ["f16", "two"], ["f16_out"]),
        helper.make_node("Not", ["flag"], ["flag_out"]),
        helper.make_node("Identity", ["text"], ["text_out"]),
    ]
    return _model(
        nodes,
        [
            _value("i32", TensorProto.INT32, ["batch", width]),
            _value("f16", TensorProto.FLOAT16, ["batch", width]),
            _value("flag", TensorProto.BOOL, ["batch", width]),
            _value("text", TensorProto.STRING, ["batch", 1]),
        ],
        [
            _value("i32_out", TensorProto.INT32, ["batch", width]),
            _value("f16_out", TensorProto.FLOAT16, ["batch", width]),
            _value("flag_out", TensorProto.BOOL, ["batch", width]),
            _value("text_out", TensorProto.STRING, ["batch", 1]),
        ],
        "typed",
    )


CORRUPT_MODEL = b"this is not an ONNX model, it is a file someone copied by mistake\n"


def write_config(repository: Path, name: str, config: dict[str, Any]) -> None:
    directory = Path(repository) / name
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def write_provenance(version_dir: Path, provenance: Mapping[str, Any]) -> None:
    """<version>/provenance.json, as config.read_provenance reads it (the one writer: seed,
    models import, models quantize); unchanged content is not rewritten."""
    write_if_changed(version_dir / PROVENANCE_FILE, (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode())


def write_version(repository: Path, name: str, version: int, model: bytes) -> Path:
    """Publish <repository>/<name>/<version>/model.onnx atomically (staged, then renamed in).

    A poller can never see a half-written version directory this way.
    """
    directory = Path(repository) / name
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=directory))
    try:
        (staging / MODEL_FILE).write_bytes(model)
        os.chmod(staging, 0o755)
        target = directory / str(version)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / MODEL_FILE
