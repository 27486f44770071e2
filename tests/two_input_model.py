"""A two-input ranker built with onnx.helper, unlike the demo's in every way that matters
to the model tools: INT64 categorical ids through an embedding table plus FP32 dense
features, of widths other than 64 (ids [-1, 2], dense [-1, 6] -> score [-1, 1])."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infermesh.workload.model import IR_VERSION, OPSET

CATEGORIES = 40
EMBEDDING = 8
ID_COLUMNS = 2
DENSE_COLUMNS = 6
HIDDEN = 32


def two_input_model(seed: int = 0, damage: float = 0.0) -> bytes:
    """ids -> Gather(embeddings) -> flatten, concat dense -> 32 relu -> score. `damage` > 0
    adds that much noise (relative to each weight's scale) to every weight: a damaged model."""
    rng = np.random.default_rng(seed)
    width = ID_COLUMNS * EMBEDDING + DENSE_COLUMNS
    weights = {
        "embeddings": rng.standard_normal((CATEGORIES, EMBEDDING)),
        "w1": rng.standard_normal((width, HIDDEN)) * np.sqrt(2.0 / width),
        "b1": rng.standard_normal(HIDDEN) * 0.1,
        "w2": rng.standard_normal((HIDDEN, 1)) * np.sqrt(1.0 / HIDDEN),
    }
    noise = np.random.default_rng(seed + 1)
    initializers = [
        numpy_helper.from_array(
            (value + damage * value.std() * noise.standard_normal(value.shape)).astype(np.float32), name
        )
        for name, value in weights.items()
    ]
    initializers.append(numpy_helper.from_array(np.array([-1, ID_COLUMNS * EMBEDDING], np.int64), "flat"))
    nodes = [
        helper.make_node("Gather", ["embeddings", "ids"], ["looked_up"]),
        helper.make_node("Reshape", ["looked_up", "flat"], ["id_features"]),
        helper.make_node("Concat", ["id_features", "dense"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_input_ranker",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", ID_COLUMNS]),
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", DENSE_COLUMNS]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()
