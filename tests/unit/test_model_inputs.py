"""The pipeline's column mapping on the request path: features builds one tensor per named
model input with its dtype (services/features/model_inputs.py), the gateway sends them all
in one ModelInfer, coalesced calls join them input by input, and the fallback follows the
pipeline's `fallback` section. The retail example (examples/retail) is the multi-input case."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.fallback import FeatureMatrix, fallback_scores
from gateway.pipeline import Pipeline, PipelineConfig, RequestState, Stubs
from gateway.stage_calls import concatenate_rows, input_layout, split_scores
from services.features.cache import LocalCache
from services.features.layout import entity_key_prefix
from services.features.model_inputs import request_layout
from services.features.pipeline_views import checked_layout
from services.features.registry import FeatureView
from services.features.store import FeatureStore
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.infermesh.features.v1 import features_pb2
from services.runtime.breaker import CircuitBreaker
from services.runtime.pipeline import load_pipeline

RETAIL = Path(__file__).resolve().parents[2] / "examples" / "retail" / "pipeline.yaml"
NS = "t"


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        if self.down:
            raise ConnectionError("connection refused")
        return [self.data.get(k) for k in keys]


def record(view: FeatureView, **values: object) -> bytes:
    out = np.zeros(1, dtype=view.record_dtype)
    for name, value in values.items():
        out[name] = value
    return out.tobytes()


def test_the_demo_sends_its_one_input_once_as_the_fallback_rows() -> None:
    pipeline = load_pipeline()
    registry, layout = checked_layout(pipeline)
    assert layout.inputs == () and layout.vectors is not None
    assert (layout.vectors.name, layout.vectors.datatype, layout.vectors.width) == ("features", "FP32", 64)
    assert [(c.view, c.feature, c.of_user, c.start, c.stop) for c in layout.vectors.columns] == [
        ("user", "vec", True, 0, 32),
        ("item", "vec", False, 32, 64),
    ]
    assert (layout.user_columns, layout.user_views, layout.item_views) == (32, ("user",), ("item",))


def test_the_retail_pipeline_maps_two_inputs_and_its_own_fallback_vectors() -> None:
    pipeline = load_pipeline(RETAIL)
    registry, layout = checked_layout(pipeline)
    assert [(t.name, t.datatype, t.width) for t in layout.inputs] == [("ids", "INT64", 2), ("dense", "FP32", 17)]
    assert [(c.view, c.feature, c.of_user, c.start, c.stop) for c in layout.inputs[1].columns] == [
        ("customer", "taste", True, 0, 8),
        ("product", "taste", False, 8, 16),
        ("product", "price", False, 16, 17),
    ]
    assert layout.vectors is not None and layout.vectors.name == "" and layout.user_columns == 8
    assert (layout.user_views, layout.item_views) == (("customer",), ("product",))
    assert request_layout(pipeline, registry) == layout


def test_a_neutral_fallback_sends_no_vectors(tmp_path: Path) -> None:
    text = RETAIL.read_text().replace("scores: dot_product", "scores: neutral")
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.replace("registry: views.yaml", f"registry: {RETAIL.parent / 'views.yaml'}"))
    _, layout = checked_layout(load_pipeline(path))
    assert layout.vectors is None and layout.user_columns == 0 and len(layout.inputs) == 2


async def test_features_fill_each_named_input_with_its_dtype() -> None:
    registry, layout = checked_layout(load_pipeline(RETAIL))
    customer, product = registry.views["customer"], registry.views["product"]
    fake = FakeRedis()
    taste = np.arange(8, dtype=np.float32)
    fake.data[entity_key_prefix(NS, customer.key) + "c1"] = record(customer, segment=3, taste=taste, _written_at=1e9)
    for p in (1, 2):
        fake.data[entity_key_prefix(NS, product.key) + f"p{p}"] = record(
            product, brand=10 + p, department=p, taste=-taste * p, price=5.0 * p, _written_at=1e9
        )
    store = FeatureStore(fake, NS, 100, registry=registry, layout=layout)  # type: ignore[arg-type]
    rows = await store.get("c1", ["p2", "nope", "p1"])
    ids, dense = rows.inputs
    assert (ids.name, ids.datatype, ids.columns, dense.name, dense.datatype, dense.columns) == (
        "ids",
        "INT64",
        2,
        "dense",
        "FP32",
        17,
    )
    assert np.frombuffer(ids.data, "<i8").reshape(3, 2).tolist() == [[3, 12], [3, 0], [3, 11]]
    dense_rows = np.frombuffer(dense.data, "<f4").reshape(3, 17)
    assert (dense_rows[:, :8] == taste).all() and (dense_rows[0, 8:16] == -2 * taste).all()
    assert dense_rows[:, 16].tolist() == [10.0, 0.0, 5.0]  # the missing product: its defaults
    vectors = np.frombuffer(rows.model_input, "<f4").reshape(3, 16)
    assert rows.user_columns == 8 and rows.model_input_name == "" and (vectors == dense_rows[:, :16]).all()
    assert np.frombuffer(rows.item_categories, "<i4").tolist() == [2, 0, 1] and rows.missing_items == 1


async def test_degraded_when_redis_is_down_with_the_mapping() -> None:
    registry, layout = checked_layout(load_pipeline(RETAIL))
    fake = FakeRedis()
    fake.down = True
    store = FeatureStore(
        fake,  # type: ignore[arg-type]
        NS,
        100,
        registry=registry,
        layout=layout,
        cache=LocalCache(1 << 20, 30.0),
        breaker=CircuitBreaker(2, probe_interval=10.0),
    )
    rows = await store.get("c1", ["p1", "p2"])
    assert rows.degraded and [len(t.data) for t in rows.inputs] == [2 * 2 * 8, 2 * 17 * 4]


def tensor(name: str, datatype: str, values: np.ndarray) -> features_pb2.DenseMatrix:
    return features_pb2.DenseMatrix(
        data=values.tobytes(), rows=values.shape[0], columns=values.shape[1], datatype=datatype, name=name
    )


def retail_reply(n: int) -> features_pb2.GetFeaturesResponse:
    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, 16)).astype("<f4")
    return features_pb2.GetFeaturesResponse(
        model_input=tensor("", "FP32", vectors),
        user_columns=8,
        inputs=[
            tensor("ids", "INT64", rng.integers(0, 9, (n, 2)).astype("<i8")),
            tensor("dense", "FP32", rng.standard_normal((n, 17)).astype("<f4")),
        ],
        item_categories=np.zeros(n, "<i4").tobytes(),
        item_present=np.ones(n, np.uint8).tobytes(),
    )


class Stage:
    """Features and scoring stand-ins (these tests stop at scoring): scoring fails when told to."""

    def __init__(self, reply: features_pb2.GetFeaturesResponse, scoring_down: bool = False) -> None:
        self.reply, self.scoring_down = reply, scoring_down
        self.infer: list[inference_pb2.ModelInferRequest] = []

    async def GetFeatures(self, request: object, timeout: float) -> features_pb2.GetFeaturesResponse:
        return self.reply

    async def ModelInfer(self, request: inference_pb2.ModelInferRequest, timeout: float) -> object:
        self.infer.append(request)
        if self.scoring_down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")
        reply = inference_pb2.ModelInferResponse(model_name=request.model_name, model_version="1")
        reply.outputs.add(name="score", datatype="FP32", shape=[request.inputs[0].shape[0], 1])
        reply.raw_output_contents.append(np.linspace(0, 1, request.inputs[0].shape[0], dtype="<f4").tobytes())
        return reply


def pipeline_over(stage: Stage, **config: object) -> Pipeline:
    return Pipeline(Stubs(stage, stage, stage), PipelineConfig(**config))  # type: ignore[arg-type]


def test_the_gateway_sends_every_named_input_as_it_arrived() -> None:
    reply = retail_reply(5)
    pipeline = pipeline_over(Stage(reply), model_name="retail-ranker")
    infer = pipeline._infer_request(pipeline.experiments.assign("c1"), reply)
    assert [(t.name, t.datatype, list(t.shape)) for t in infer.inputs] == [
        ("ids", "INT64", [5, 2]),
        ("dense", "FP32", [5, 17]),
    ]
    assert list(infer.raw_input_contents) == [reply.inputs[0].data, reply.inputs[1].data]


def test_without_named_inputs_the_fallback_rows_are_the_models_one_input() -> None:
    reply = retail_reply(3)
    del reply.inputs[:]
    reply.model_input.name = "features"
    pipeline = pipeline_over(Stage(reply))
    infer = pipeline._infer_request(pipeline.experiments.assign("u1"), reply)
    assert [(t.name, list(t.shape)) for t in infer.inputs] == [("features", [3, 16])]
    assert list(infer.raw_input_contents) == [reply.model_input.data]


def test_coalesced_requests_join_input_by_input_and_split_back() -> None:
    pipeline = pipeline_over(Stage(retail_reply(1)))
    requests = [pipeline._infer_request(pipeline.experiments.assign("u"), retail_reply(n)) for n in (2, 3)]
    assert input_layout(requests[0]) == input_layout(requests[1])
    combined, rows = concatenate_rows(requests)
    assert rows == [2, 3] and [list(t.shape) for t in combined.inputs] == [[5, 2], [5, 17]]
    for i in range(2):
        assert combined.raw_input_contents[i] == b"".join(r.raw_input_contents[i] for r in requests)
    reply = inference_pb2.ModelInferResponse(model_name="m")
    reply.outputs.add(name="score", datatype="FP32", shape=[5, 1])
    reply.raw_output_contents.append(np.arange(5, dtype="<f4").tobytes())
    split = split_scores(reply, rows)
    assert [np.frombuffer(r.raw_output_contents[0], "<f4").tolist() for r in split] == [[0, 1], [2, 3, 4]]


@pytest.mark.parametrize("scores", ["dot_product", "neutral"])
async def test_the_fallback_follows_the_pipeline(scores: str) -> None:
    reply = retail_reply(6)
    stage = Stage(reply, scoring_down=True)
    pipeline = pipeline_over(stage, fallback_scores=scores, neutral_score=0.25, fallback_model_name="fallback-taste")
    state_scores = await pipeline._score(_state(pipeline), reply, 6)
    assert state_scores.model_name == "fallback-taste" and len(stage.infer[0].inputs) == 2
    vectors = np.frombuffer(reply.model_input.data, "<f4").reshape(6, 16)
    expected = fallback_scores(FeatureMatrix(vectors, 8), 6) if scores == "dot_product" else np.full(6, 0.25)
    assert np.allclose(state_scores.scores, expected)


def _state(pipeline: Pipeline) -> RequestState:
    budget = pipeline.config.budgets.plan(2.0, ("features", "scoring", "ranking"))
    return RequestState(pipeline.experiments.assign("c1"), "c1", 5, 0, False, budget)
