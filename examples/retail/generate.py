#!/usr/bin/env python3
"""The retail example's data: customers and products for its views, and its model repository.

    python examples/retail/generate.py            # writes examples/retail/data/
    python examples/retail/generate.py --out DIR  # somewhere else (pipeline.yaml reads data/)

Deterministic for a --seed. Writes, as a platform team would bring them:

* customers.csv: customer_id, segment (int64), taste_0..taste_7 (float32): one column per
  element of the vector feature, as `infermesh features ingest` reads CSV;
* products.parquet: product_id, brand (int64), department (int32), taste (a list column of
  8 float32), price (float32);
* models/retail-ranker/config.pbtxt and models/retail-ranker/1/model.onnx: a Triton-style
  repository of a two-input model built with onnx.helper: INT64 ids [segment, brand]
  through two embedding tables, FP32 dense [customer taste, product taste, price].

The model's score is sigmoid(segment_embedding . brand_embedding + customer_taste .
product_taste / sqrt(8) - price / 100 + bias): no training, the weights are the generator's
own ground truth, so every score can be computed from the files alone (the end-to-end test
does). Uses only numpy, onnx and pyarrow: nothing of infermesh.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

CUSTOMERS, PRODUCTS = 500, 5_000
SEGMENTS, BRANDS, DEPARTMENTS = 8, 50, 12
TASTE, EMBEDDING = 8, 4
MODEL = "retail-ranker"
# ONNX opset and IR version ONNX Runtime 1.17 and later run.
OPSET, IR_VERSION = 17, 8

CONFIG_PBTXT = f"""\
# A Triton model configuration, as Triton reads it (protobuf text of model_config.proto).
name: "{MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: 4096
input [
  {{ name: "ids" data_type: TYPE_INT64 dims: [ 2 ] }},
  {{ name: "dense" data_type: TYPE_FP32 dims: [ {2 * TASTE + 1} ] }}
]
output [
  {{ name: "score" data_type: TYPE_FP32 dims: [ 1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 500
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


def tables(seed: int) -> dict[str, np.ndarray]:
    """The catalog and the model's weights, all from one seed."""
    rng = np.random.default_rng(seed)
    return {
        "segment": rng.integers(0, SEGMENTS, CUSTOMERS),
        "customer_taste": rng.standard_normal((CUSTOMERS, TASTE)).astype(np.float32),
        "brand": rng.integers(0, BRANDS, PRODUCTS),
        "department": rng.integers(0, DEPARTMENTS, PRODUCTS).astype(np.int32),
        "product_taste": rng.standard_normal((PRODUCTS, TASTE)).astype(np.float32),
        "price": rng.uniform(1.0, 100.0, PRODUCTS).astype(np.float32),
        "segment_embeddings": rng.standard_normal((SEGMENTS, EMBEDDING)).astype(np.float32) * 0.7,
        "brand_embeddings": rng.standard_normal((BRANDS, EMBEDDING)).astype(np.float32) * 0.7,
    }


def model(segment_embeddings: np.ndarray, brand_embeddings: np.ndarray) -> bytes:
    """ids [N, 2] INT64, dense [N, 17] FP32 -> score [N, 1] FP32."""

    def const(name: str, value: object, dtype: type = np.int64) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    initializers = [
        numpy_helper.from_array(segment_embeddings, "segment_embeddings"),
        numpy_helper.from_array(brand_embeddings, "brand_embeddings"),
        const("zero", 0),
        const("one", 1),
        const("axis1", [1]),
        const("customer_start", [0]),
        const("product_start", [TASTE]),
        const("price_start", [2 * TASTE]),
        const("price_end", [2 * TASTE + 1]),
        const("taste_scale", 1.0 / math.sqrt(TASTE), np.float32),
        const("price_weight", -0.01, np.float32),
        const("bias", 0.2, np.float32),
    ]
    nodes = [
        # Categorical ids through their embeddings: the segment's and the brand's affinity.
        helper.make_node("Gather", ["ids", "zero"], ["segment"], axis=1),
        helper.make_node("Gather", ["ids", "one"], ["brand"], axis=1),
        helper.make_node("Gather", ["segment_embeddings", "segment"], ["segment_vector"]),
        helper.make_node("Gather", ["brand_embeddings", "brand"], ["brand_vector"]),
        helper.make_node("Mul", ["segment_vector", "brand_vector"], ["affinity_terms"]),
        helper.make_node("ReduceSum", ["affinity_terms", "axis1"], ["affinity"], keepdims=1),
        # Dense features: the two taste vectors' dot product and the price.
        helper.make_node("Slice", ["dense", "customer_start", "product_start", "axis1"], ["customer_taste"]),
        helper.make_node("Slice", ["dense", "product_start", "price_start", "axis1"], ["product_taste"]),
        helper.make_node("Slice", ["dense", "price_start", "price_end", "axis1"], ["price"]),
        helper.make_node("Mul", ["customer_taste", "product_taste"], ["taste_terms"]),
        helper.make_node("ReduceSum", ["taste_terms", "axis1"], ["taste_dot"], keepdims=1),
        helper.make_node("Mul", ["taste_dot", "taste_scale"], ["taste"]),
        helper.make_node("Mul", ["price", "price_weight"], ["price_term"]),
        helper.make_node("Add", ["affinity", "taste"], ["sum1"]),
        helper.make_node("Add", ["sum1", "price_term"], ["sum2"]),
        helper.make_node("Add", ["sum2", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "retail_ranker",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 2 * TASTE + 1]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializers,
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(built)
    return built.SerializeToString()


def write(out: Path, seed: int) -> None:
    t = tables(seed)
    out.mkdir(parents=True, exist_ok=True)
    header = "customer_id,segment," + ",".join(f"taste_{i}" for i in range(TASTE))
    lines = [header] + [
        f"c{c},{t['segment'][c]}," + ",".join(f"{v:.6f}" for v in t["customer_taste"][c]) for c in range(CUSTOMERS)
    ]
    (out / "customers.csv").write_text("\n".join(lines) + "\n")
    # The CSV's six decimals are what the view holds: the model and the test read those.
    products = pa.table(
        {
            "product_id": [f"p{p}" for p in range(PRODUCTS)],
            "brand": pa.array(t["brand"], pa.int64()),
            "department": pa.array(t["department"], pa.int32()),
            "taste": pa.array(list(t["product_taste"]), pa.list_(pa.float32())),
            "price": pa.array(t["price"], pa.float32()),
        }
    )
    pq.write_table(products, out / "products.parquet")
    repository = out / "models" / MODEL
    (repository / "1").mkdir(parents=True, exist_ok=True)
    (repository / "config.pbtxt").write_text(CONFIG_PBTXT)
    (repository / "1" / "model.onnx").write_bytes(model(t["segment_embeddings"], t["brand_embeddings"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data", help="output folder")
    parser.add_argument("--seed", type=int, default=7, help="catalog and model seed (default %(default)s)")
    args = parser.parse_args()
    write(args.out, args.seed)
    print(f"wrote {CUSTOMERS} customers, {PRODUCTS} products and the {MODEL!r} model repository to {args.out}")


if __name__ == "__main__":
    main()
