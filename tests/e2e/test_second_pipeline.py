"""The retail example (examples/retail) end to end, as a user runs it: its generator writes
the views' files and a Triton-style model repository (config.pbtxt), and
`infermesh up --pipeline examples/retail/pipeline.yaml` ingests them and serves a two-input
model (INT64 ids through embeddings + FP32 dense features) with no code change.

Through Envoy's edge: REST and gRPC Recommend agree with the ranking computed here from
the files alone (local ONNX Runtime, the pipeline's calibration, rules and category cap);
an unmodified tritonclient.grpc runs ModelInfer on the model; one trace holds every hop;
with Redis stopped, Recommend still answers, flagged degraded, and recovers once it is back.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import Trace, TraceStore
from infermesh.up.supervisor import free_port
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.ranking.chain import platt
from services.ranking.rank import RankInput, top_k
from tests.processes import start_socket_redis, start_up, stop, wait_until, wait_until_up

pytestmark = pytest.mark.timeout(400)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "retail"
MODEL = "retail-ranker"
CUSTOMER = "c42"
CANDIDATES = [f"p{n}" for n in range(3, 5_000, 25)]  # 200 products
K, MAX_PER_CATEGORY, DENIED_DEPARTMENT = 20, 5, 11
PLATT_A, PLATT_B = 1.5, -0.5  # examples/retail/pipeline.yaml's calibration
SERVICES = {"envoy", "gateway", "features", "scoring", "ranking"}

TRITON_PROGRAM = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

client = triton.InferenceServerClient(sys.argv[1])
ids = np.array([[0, 1], [3, 49], [7, 0]], dtype=np.int64)
dense = np.random.default_rng(3).standard_normal((3, 17)).astype(np.float32)
inputs = [triton.InferInput("ids", list(ids.shape), "INT64"), triton.InferInput("dense", list(dense.shape), "FP32")]
inputs[0].set_data_from_numpy(ids)
inputs[1].set_data_from_numpy(dense)
result = client.infer(sys.argv[2], inputs, outputs=[triton.InferRequestedOutput("score")])
metadata = client.get_model_metadata(sys.argv[2], as_json=True)
print(json.dumps({
    "ready": client.is_model_ready(sys.argv[2]),
    "inputs": [(i["name"], i["datatype"]) for i in metadata["inputs"]],
    "ids": ids.tolist(), "dense": dense.tolist(),
    "scores": result.as_numpy("score").tolist(),
    "version": result.get_response().model_version,
}))
"""


@dataclass
class Retail:
    root: Path  # the example, copied, with its generated data/
    edge: int
    redis: subprocess.Popen[bytes]
    receiver: OtlpReceiver
    output: list[str]


@pytest.fixture(scope="module")
def retail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retail]:
    workdir = tmp_path_factory.mktemp("retail")
    root = workdir / "retail"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("data", "__pycache__"))
    generated = subprocess.run([sys.executable, str(root / "generate.py")], capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    redis_process = start_socket_redis(workdir)  # ours to stop and start again
    receiver = OtlpReceiver(TraceStore()).start()
    edge = free_port()
    up = start_up(
        workdir / "up",
        f"unix://{workdir / 'redis.sock'}?db=0",
        edge,
        "--pipeline",
        str(root / "pipeline.yaml"),
        "--replicas",
        "scoring=1",
        "--workers",
        "0",
        "--otlp-endpoint",
        receiver.endpoint,
        "--trace-sampling",
        "1.0",
        env={
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            # Entries go stale fast and Redis failures open the breaker fast: degraded mode
            # shows within a second of Redis stopping, and ends as soon as it is back.
            "FEATURES_CACHE_TTL_SECONDS": "0.2",
            "FEATURES_REDIS_TIMEOUT_SECONDS": "0.3",
            "FEATURES_BREAKER_PROBE_SECONDS": "0.25",
        },
    )
    output: list[str] = []
    retail = Retail(root, edge, redis_process, receiver, output)
    try:
        wait_until_up(up, output, timeout=180)
        yield retail
    finally:
        stop(up, timeout=60)
        receiver.stop()
        stop(retail.redis)  # the one running now: a test restarts it


@pytest.fixture(scope="module")
def expected(retail: Retail) -> list[tuple[str, float, int]]:
    """The ranking computed without the mesh: the files -> the model's two inputs -> local
    ONNX Runtime -> the pipeline's rules, Platt calibration and category cap -> top k."""
    data = retail.root / "data"
    with (data / "customers.csv").open() as handle:
        customer = next(row for row in csv.DictReader(handle) if row["customer_id"] == CUSTOMER)
    taste = np.array([float(customer[f"taste_{i}"]) for i in range(8)], dtype=np.float32)
    products = pq.read_table(data / "products.parquet").to_pydict()
    index = [int(p[1:]) for p in CANDIDATES]
    ids = np.array([[int(customer["segment"]), products["brand"][i]] for i in index], dtype=np.int64)
    dense = np.array([[*taste, *products["taste"][i], products["price"][i]] for i in index], dtype=np.float32)
    session = ort.InferenceSession(str(data / "models" / MODEL / "1" / "model.onnx"))
    raw = session.run(None, {"ids": ids, "dense": dense})[0][:, 0]
    scores = platt(PLATT_A, PLATT_B)(raw.astype(np.float32)).astype(np.float32)
    departments = np.array([products["department"][i] for i in index], dtype=np.int32)
    chosen = top_k(RankInput(scores, departments, departments != DENIED_DEPARTMENT), K, MAX_PER_CATEGORY)
    return [(CANDIDATES[i], float(scores[i]), int(departments[i])) for i in chosen]


def recommend(retail: Retail, timeout: float = 10) -> gateway_pb2.RecommendResponse:
    with grpc.insecure_channel(f"127.0.0.1:{retail.edge}") as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Recommend(
            gateway_pb2.RecommendRequest(user_id=CUSTOMER, candidate_ids=CANDIDATES, k=K), timeout=timeout
        )


def check_ranked(items: list[tuple[str, float, int]], expected: list[tuple[str, float, int]]) -> None:
    assert [i for i, _, _ in items] == [i for i, _, _ in expected]
    assert np.allclose([s for _, s, _ in items], [s for _, s, _ in expected], atol=1e-5)
    assert [c for _, _, c in items] == [c for _, _, c in expected]
    assert DENIED_DEPARTMENT not in {c for _, _, c in items}


def test_up_loaded_the_pipelines_own_data(retail: Retail) -> None:
    text = "".join(retail.output)
    assert "loading the pipeline's data" in text and "checking the demo data" not in text, text
    assert "ingested view 'customer'" in text and "ingested view 'product'" in text, text


def test_rest_recommend_through_envoy(retail: Retail, expected: list[tuple[str, float, int]]) -> None:
    body = json.dumps({"user_id": CUSTOMER, "candidate_ids": CANDIDATES, "k": K}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{retail.edge}/v1/recommend", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        reply = json.loads(response.read())
    check_ranked([(i["item_id"], i["score"], i.get("category", 0)) for i in reply["items"]], expected)
    assert (reply["model_name"], reply["model_version"]) == (MODEL, "1")
    assert not reply.get("degraded", False)


def test_grpc_recommend_through_envoy(retail: Retail, expected: list[tuple[str, float, int]]) -> None:
    reply = recommend(retail)
    check_ranked([(i.item_id, i.score, i.category) for i in reply.items], expected)
    assert (reply.model_name, reply.model_version, reply.degraded) == (MODEL, "1", False)
    assert {t.stage for t in reply.stage_timings} == {"features", "scoring", "ranking"}


def test_tritonclient_runs_the_two_input_model_through_the_edge(retail: Retail) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRITON_PROGRAM, f"127.0.0.1:{retail.edge}", MODEL],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",  # a user's process: tritonclient's own `inference.*` stubs, not ours
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    assert answer["ready"] and answer["version"] == "1"
    assert answer["inputs"] == [["ids", "INT64"], ["dense", "FP32"]]
    session = ort.InferenceSession(str(retail.root / "data" / "models" / MODEL / "1" / "model.onnx"))
    local = session.run(
        None, {"ids": np.array(answer["ids"], np.int64), "dense": np.array(answer["dense"], np.float32)}
    )[0]
    assert np.allclose(answer["scores"], local, atol=1e-6)


def _whole(trace: Trace) -> bool:
    """Every service's spans and the chain's stages arrived, in one tree under the edge's span
    (each process exports on its own schedule, Envoy's last)."""
    stages = {"infermesh.ranking.rules", "infermesh.ranking.calibration", "infermesh.ranking.category_cap"}
    names = {s.name for s in trace.spans}
    return (
        set(trace.services) == SERVICES
        and names >= stages | {"infermesh.scoring.inference"}
        and [s.label for s in trace.roots()] == [("envoy", "edge ingress")]
    )


def test_one_trace_holds_every_hop(retail: Retail) -> None:
    reply = recommend(retail)
    trace = retail.receiver.store.wait_for(reply.trace_id, _whole, timeout=30)
    if trace is None:
        got = retail.receiver.store.get(reply.trace_id)
        spans = "\n".join(f"{'  ' * d}{s.service} | {s.name}" for d, s in got.walk()) if got else "no span"
        raise AssertionError(f"trace {reply.trace_id} never became one tree of every service and stage:\n{spans}")
    names = {s.name for s in trace.spans}
    assert "infermesh.ranking.seen_filter" not in names and "infermesh.ranking.mmr" not in names


def test_degraded_while_redis_is_down_then_recovered(retail: Retail, expected: list) -> None:
    recommend(retail)  # warm
    stop(retail.redis)
    try:
        replies: list[gateway_pb2.RecommendResponse] = []

        def degraded() -> bool:
            replies.append(recommend(retail))  # never fails: cache and view defaults answer
            return replies[-1].degraded

        wait_until(degraded, 20, "Recommend never answered degraded with Redis stopped", interval=0.2)
        reply = replies[-1]
        assert "features_store_unavailable" in reply.degraded_reasons
        assert len(reply.items) == K and reply.model_name == MODEL
    finally:
        retail.redis = start_socket_redis(retail.root.parent)  # its dump brings the same data back
    wait_until(lambda: not recommend(retail).degraded, 20, "still degraded after Redis came back", interval=0.25)
    time.sleep(0.5)  # past the cache TTL: everything re-read from Redis
    check_ranked([(i.item_id, i.score, i.category) for i in recommend(retail).items], expected)
