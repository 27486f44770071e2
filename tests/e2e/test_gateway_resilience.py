"""The gateway's deadlines, fallbacks and experiments through a real mesh of this module's
own (own Redis, Envoy, services, and a model repository with two versions of the ranker
and a genuinely slow model), so the session `mesh` is not touched.

In order, because the last tests stop backends: A/B arms route to model versions; shadow
copies reach the candidate while responses come from the primary; a broken experiments
file keeps the previous configuration; a slow model falls back within the deadline; with
scoring and then ranking stopped the gateway keeps answering from its fallbacks.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from gateway.experiments import parse
from gateway.fallback import FALLBACK_MODEL_NAME, FeatureMatrix, fallback_rank, fallback_scores
from infermesh.up.supervisor import Mesh
from infermesh.workload.catalog import generate_catalog, model_input
from infermesh.workload.seed import model_repository
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.inference import grpc_predict_v2_pb2_grpc as inference_pb2_grpc
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.topology import GATEWAY, RANKING, SCORING
from tests.conftest import RedisServer, running_mesh, seed_small
from tests.processes import Samples, metric, scrape, stop, wait_until

SMALL = {"n_users": 50, "n_items": 3_000, "n_categories": 10}
SEED = 11
REDIS_DB = 13  # a database of its own on the session's test Redis
K = 10
MAX_PER_CATEGORY = 5
DEADLINE = 1.0  # seconds, the callers' gRPC deadline and the gateway's default for REST
SLOW_QUEUE_DELAY_US = 5_000_000  # the slow model holds every request 5 s for a batch
CANDIDATES = [f"i{n}" for n in range(0, 3_000, 15)]  # 200 items


@dataclass
class OwnMesh:
    mesh: Mesh
    experiments: Path
    stub: gateway_pb2_grpc.GatewayServiceStub

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.mesh.topology.edge_port}"

    def recommend(self, user: str = "u1", timeout: float = DEADLINE, **fields: object) -> gateway_pb2.RecommendResponse:
        request = gateway_pb2.RecommendRequest(user_id=user, candidate_ids=CANDIDATES, k=K, **fields)
        return self.stub.Recommend(request, timeout=timeout)

    def metrics(self) -> Samples:
        return scrape(self.mesh.metrics_ports[f"{GATEWAY}-0"])

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.mesh.metrics_ports[f"{GATEWAY}-0"], name, **labels)

    def configure(self, doc: object, user: str, arm: str) -> None:
        """Write the experiments file and wait until the gateway serves `user` from `arm`."""
        self.experiments.write_text(yaml.safe_dump(doc))
        wait_until(
            lambda: self.recommend(user, timeout=5).experiment_arm == arm, 10, f"the gateway did not pick up {doc}"
        )


def write_slow_model(repository: Path) -> None:
    """slow_ranker: the ranker behind a batcher that waits 5 s for a batch of 65,536 rows.

    The batch is far larger than anything the test sends, hedged copies and coalesced calls
    included (a batch of 4,096 filled up with them and answered at once)."""
    ranker = repository / "ranker"
    slow = repository / "slow_ranker"
    shutil.copytree(ranker / "1", slow / "1")
    config = json.loads((ranker / "config.json").read_text())
    config.pop("name", None)
    config["max_batch_size"] = 65_536
    config["dynamic_batching"] = {
        "max_queue_delay_microseconds": SLOW_QUEUE_DELAY_US,
        "preferred_batch_size": [config["max_batch_size"]],
    }
    (slow / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def own_mesh(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[OwnMesh]:
    workdir = tmp_path_factory.mktemp("gateway-e2e")
    url = redis_server.url_for(REDIS_DB)
    seed_small(workdir, url, SEED, force=True, **SMALL)
    repository = model_repository(workdir)
    # Version 2 of the ranker is a copy of version 1: both serve, and they agree.
    shutil.copytree(repository / "ranker" / "1", repository / "ranker" / "2")
    config = json.loads((repository / "ranker" / "config.json").read_text())
    config["version_policy"] = {"all": {}}
    (repository / "ranker" / "config.json").write_text(json.dumps(config))
    write_slow_model(repository)
    experiments = workdir / "experiments.yaml"
    experiments.write_text("{}\n")
    extra_env = {
        "GATEWAY_EXPERIMENTS_FILE": str(experiments),
        "GATEWAY_EXPERIMENTS_RELOAD_SECONDS": "0.1",
        "GATEWAY_TIMEOUT_SECONDS": str(DEADLINE),
    }
    with running_mesh(workdir, url, {}, extra_env=extra_env, repository=repository) as mesh:
        with grpc.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}") as channel:
            yield OwnMesh(mesh, experiments, gateway_pb2_grpc.GatewayServiceStub(channel))


@dataclass(frozen=True)
class Fallback:
    """What the gateway's fallback gives u1, computed here from the catalog."""

    scores: dict[str, float]  # every candidate's fallback score
    ranking: list[tuple[str, float, int]]  # top K by it with the category cap, nothing filtered


@pytest.fixture(scope="module")
def fallback() -> Fallback:
    catalog = generate_catalog(seed=SEED, **SMALL)
    index = [int(i[1:]) for i in CANDIDATES]
    rows = model_input(catalog.user_vecs[1], catalog.item_vecs[index])
    # The layout the feature service states: the user's vector, then the item's.
    scores = fallback_scores(FeatureMatrix(rows, catalog.user_vecs.shape[1]), len(index))
    categories = catalog.item_category[index].astype("<i4")
    ranked = fallback_rank(CANDIDATES, scores, categories.tobytes(), b"", K, 0, MAX_PER_CATEGORY)
    return Fallback(
        dict(zip(CANDIDATES, scores.tolist(), strict=True)),
        [(i.item_id, i.score, i.category) for i in ranked.items],
    )


def assert_fallback_scores(reply: gateway_pb2.RecommendResponse, expected: Fallback) -> None:
    """Ranked by the fallback scores (the ranking service may still filter, e.g. seen items)."""
    scores = [i.score for i in reply.items]
    assert len(reply.items) == K and scores == sorted(scores, reverse=True)
    assert np.allclose(scores, [expected.scores[i.item_id] for i in reply.items], atol=1e-5)
    categories = [i.category for i in reply.items]
    assert max(categories.count(c) for c in categories) <= MAX_PER_CATEGORY
    assert reply.model_name == FALLBACK_MODEL_NAME and reply.model_version == ""


def assert_gateway_ranking(reply: gateway_pb2.RecommendResponse, expected: Fallback) -> None:
    """Both fallbacks: exactly the top K by fallback score with the category cap."""
    assert [(i.item_id, i.category) for i in reply.items] == [(e[0], e[2]) for e in expected.ranking]
    assert np.allclose([i.score for i in reply.items], [e[1] for e in expected.ranking], atol=1e-5)
    assert reply.model_name == FALLBACK_MODEL_NAME and reply.model_version == ""


def model_statistics(own: OwnMesh, model: str, version: str) -> tuple[int, int]:
    """(successful requests, rows inferred) of one model version, from scoring's ModelStatistics."""
    replica = own.mesh.topology.replicas[SCORING][0]
    with grpc.insecure_channel(replica.address) as channel:
        stats = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            inference_pb2.ModelStatisticsRequest(name=model, version=version), timeout=5
        )
    return (
        sum(s.inference_stats.success.count for s in stats.model_stats),
        sum(s.inference_count for s in stats.model_stats),
    )


AB = {
    "name": "e2e-ab",
    "arms": [
        {"name": "control", "model": "ranker", "version": "1", "percent": 50},
        {"name": "treatment", "model": "ranker", "version": "2", "percent": 50},
    ],
}


def test_ab_arms_route_users_to_their_model_version(own_mesh: OwnMesh) -> None:
    config = parse(AB, "ranker")
    own_mesh.configure(AB, "u1", config.assign("u1", "ranker").arm)
    seen: dict[str, set[str]] = {}
    for n in range(30):
        user = f"u{n}"
        expected = config.assign(user, "ranker")
        reply = own_mesh.recommend(user)
        assert reply.experiment_arm == expected.arm and reply.model_version == expected.version
        assert not reply.degraded and len(reply.items) == K
        seen.setdefault(expected.arm, set()).add(user)
        # Stable: the same user again gets the same arm.
        assert own_mesh.recommend(user).experiment_arm == expected.arm
    assert set(seen) == {"control", "treatment"}
    for arm in ("control", "treatment"):
        assert own_mesh.metric("gateway_requests_total", experiment="e2e-ab", arm=arm, outcome="ok") >= 2 * len(
            seen[arm]
        )


def test_explain_and_offset_reach_ranking(own_mesh: OwnMesh) -> None:
    full = own_mesh.recommend("u2", explain=True)
    page = own_mesh.stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="u2", candidate_ids=CANDIDATES, k=4, offset=3), timeout=DEADLINE
    )
    assert [i.item_id for i in page.items] == [i.item_id for i in full.items][3:7]
    assert full.total_items == page.total_items >= K
    assert len(full.explanations) == len(CANDIDATES) and not page.explanations


def test_shadow_copies_reach_the_candidate_and_responses_come_from_the_primary(own_mesh: OwnMesh) -> None:
    doc = {
        "name": "e2e-shadow",
        "arms": [{"name": "primary", "model": "ranker", "version": "1", "percent": 100}],
        "shadow": {"model": "ranker", "version": "2", "max_in_flight": 4},
    }
    own_mesh.configure(doc, "u1", "primary")
    time.sleep(0.3)  # shadow copies of the probe requests land
    calls_before, rows_before = model_statistics(own_mesh, "ranker", "2")
    shadowed = own_mesh.metric("gateway_shadow_requests_total", version="2", outcome="ok")
    replies = [own_mesh.recommend(f"u{n % 20}") for n in range(20)]
    assert all(r.model_version == "1" and r.experiment_arm == "primary" and not r.degraded for r in replies)
    # Every copy compared: copies go out in batches, up to 0.1 s after they were queued.
    wait_until(
        lambda: own_mesh.metric("gateway_shadow_requests_total", version="2", outcome="ok") - shadowed >= 20,
        5,
        lambda: str(own_mesh.metrics()),
    )
    # The candidate really computed them, batched (gateway/shadow.py: fewer calls than
    # copies, every copy's rows), and (a copy of the same model) agreed exactly.
    calls, rows = model_statistics(own_mesh, "ranker", "2")
    assert rows - rows_before >= 15 * len(CANDIDATES)
    assert 1 <= calls - calls_before < 15
    samples = own_mesh.metrics()  # one scrape: a histogram's sum and count from the same moment

    def shadow_value(name: str) -> float:
        return sum(v for (n, labels), v in samples.items() if n == name and ("version", "2") in labels)

    assert shadow_value("gateway_shadow_score_abs_diff_sum") == 0.0
    overlap = shadow_value("gateway_shadow_topk_overlap_sum")
    assert overlap == shadow_value("gateway_shadow_topk_overlap_count") > 0


def test_a_broken_experiments_file_keeps_the_previous_config(own_mesh: OwnMesh) -> None:
    errors = own_mesh.metric("gateway_experiments_reloads_total", result="error")
    own_mesh.experiments.write_text("name: e2e-shadow\narms: [{name: primary, percent: 60}]\n")
    wait_until(
        lambda: own_mesh.metric("gateway_experiments_reloads_total", result="error") != errors,
        5,
        "the broken file was not noticed",
    )
    reply = own_mesh.recommend("u3")
    assert reply.experiment_arm == "primary" and reply.model_version == "1" and not reply.degraded
    # SIGHUP reloads at once too; still broken, still the old config.
    gateway = own_mesh.mesh.replica(f"{GATEWAY}-0")
    gateway.process.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    assert gateway.process.poll() is None
    assert own_mesh.recommend("u3").experiment_arm == "primary"


def test_a_slow_model_falls_back_within_the_deadline(own_mesh: OwnMesh, fallback: Fallback) -> None:
    own_mesh.configure(
        {"name": "e2e-slow", "arms": [{"name": "slow", "model": "slow_ranker", "percent": 100}]}, "u1", "slow"
    )
    degraded = own_mesh.metric("gateway_degraded_responses_total", reason="scoring_unavailable")
    request = gateway_pb2.RecommendRequest(user_id="u1", candidate_ids=CANDIDATES, k=K)
    started = time.monotonic()
    # Several at once: none hangs, each answers inside its own deadline.
    futures = [own_mesh.stub.Recommend.future(request, timeout=DEADLINE) for _ in range(8)]
    replies = [f.result() for f in futures]
    grpc_seconds = time.monotonic() - started
    # REST sets no deadline: the gateway's own default (GATEWAY_TIMEOUT_SECONDS) applies.
    body = json.dumps({"user_id": "u1", "candidate_ids": CANDIDATES, "k": K}).encode()
    started = time.monotonic()
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://{own_mesh.edge}/v1/recommend", data=body, headers={"content-type": "application/json"}
        ),
        timeout=10,
    ) as response:
        rest = json.loads(response.read())
    rest_seconds = time.monotonic() - started
    assert grpc_seconds < DEADLINE and rest_seconds < DEADLINE
    for reply in replies:
        assert reply.degraded and list(reply.degraded_reasons) == ["scoring_unavailable"]
        assert reply.experiment_arm == "slow"
        assert_fallback_scores(reply, fallback)
        timings = {t.stage: t.milliseconds for t in reply.stage_timings}
        # Cut at scoring's budget (~0.42 s of 1 s), far below the model's 5 s.
        assert 250 < timings["scoring"] < 600 and "scoring_fallback" in timings
    assert rest["degraded"] and rest["degraded_reasons"] == ["scoring_unavailable"]
    assert [i["item_id"] for i in rest["items"]] == [i.item_id for i in replies[0].items]
    assert own_mesh.metric("gateway_degraded_responses_total", reason="scoring_unavailable") - degraded >= 9
    assert own_mesh.metric("gateway_requests_total", experiment="e2e-slow", arm="slow", outcome="degraded") >= 9


def stop_role(own: OwnMesh, role: str) -> None:
    for child in own.mesh.children:
        if child.role == role:
            stop(child.process)


def test_with_scoring_and_then_ranking_stopped_the_gateway_answers_from_fallbacks(
    own_mesh: OwnMesh, fallback: Fallback
) -> None:
    own_mesh.configure({}, "u1", "")
    stop_role(own_mesh, SCORING)
    replies = [own_mesh.recommend("u1") for _ in range(5)]
    for reply in replies:
        assert list(reply.degraded_reasons) == ["scoring_unavailable"]
        assert_fallback_scores(reply, fallback)
        # Refused at once by Envoy (no healthy replica), not waited out.
        assert {t.stage: t.milliseconds for t in reply.stage_timings}["scoring"] < 300
    # Scoring has a fallback: its outage leaves the gateway ready behind the edge.
    time.sleep(1.5)  # more than one readiness interval
    assert "edge" not in own_mesh.mesh.unhealthy()

    stop_role(own_mesh, RANKING)
    full = own_mesh.recommend("u1", explain=True)
    assert list(full.degraded_reasons) == ["scoring_unavailable", "ranking_unavailable"]
    assert_gateway_ranking(full, fallback)
    assert not full.explanations and full.total_items >= K
    page = own_mesh.stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="u1", candidate_ids=CANDIDATES, k=3, offset=4), timeout=DEADLINE
    )
    assert [i.item_id for i in page.items] == [e[0] for e in fallback.ranking][4:7]
    assert page.total_items == full.total_items
    assert own_mesh.metric("gateway_degraded_responses_total", reason="ranking_unavailable") >= 2
    # Features have no fallback: a bad request is still an error, not a degraded answer.
    with pytest.raises(grpc.RpcError) as raised:
        own_mesh.recommend("u99999")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
