"""One Recommend through the real mesh, traced end to end.

A real OTLP/gRPC receiver (infermesh.traces, on opentelemetry-proto's TraceService)
gets the spans of every process: Envoy's OpenTelemetry tracer and the four services. The
test asserts the one trace's parent/child edges against the table below, the batch-queue
and inference spans, the span count, and that the response's trace id, the x-trace-id
header, every service's request log line, Envoy's access log and the metrics exemplars
all name the same trace. Then headless Chromium opens the local trace view on that trace
and saves a screenshot of its waterfall to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import Trace, TraceStore
from infermesh.traces.traceview import SERVICE_COLOURS, TraceView
from infermesh.up.supervisor import Mesh
from infermesh.workload.seed import model_repository
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import RedisServer, free_topology
from tests.processes import json_log_lines

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"

RECOMMEND = "/infermesh.gateway.v1.GatewayService/Recommend"
GET_FEATURES = "/infermesh.features.v1.FeatureService/GetFeatures"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
RANK = "/infermesh.ranking.v1.RankingService/Rank"

# Every parent -> child edge of one Recommend trace, as (service, span name) pairs.
# fmt: off
EXPECTED_EDGES: list[tuple[tuple[str, str], tuple[str, str]]] = [
    # parent                                            child
    (("envoy",    "edge ingress"),                      ("envoy",    "router gateway egress")),
    (("envoy",    "router gateway egress"),             ("gateway",  RECOMMEND)),
    (("gateway",  RECOMMEND),                           ("gateway",  GET_FEATURES)),
    (("gateway",  GET_FEATURES),                        ("envoy",    "features ingress")),
    (("envoy",    "features ingress"),                  ("envoy",    "router features egress")),
    (("envoy",    "router features egress"),            ("features", GET_FEATURES)),
    (("features", GET_FEATURES),                        ("features", "infermesh.features.cache_lookup")),
    (("features", GET_FEATURES),                        ("features", "MGET")),
    (("gateway",  RECOMMEND),                           ("gateway",  MODEL_INFER)),
    (("gateway",  MODEL_INFER),                         ("envoy",    "scoring ingress")),
    (("envoy",    "scoring ingress"),                   ("envoy",    "router scoring egress")),
    (("envoy",    "router scoring egress"),             ("scoring",  MODEL_INFER)),
    (("scoring",  MODEL_INFER),                         ("scoring",  "infermesh.scoring.queue")),
    (("scoring",  MODEL_INFER),                         ("scoring",  "infermesh.scoring.inference")),
    (("gateway",  RECOMMEND),                           ("gateway",  RANK)),
    (("gateway",  RANK),                                ("envoy",    "ranking ingress")),
    (("envoy",    "ranking ingress"),                   ("envoy",    "router ranking egress")),
    (("envoy",    "router ranking egress"),             ("ranking",  RANK)),
    (("ranking",  RANK),                                ("ranking",  "infermesh.ranking.top_k")),
    # the chain stages that apply to this request (default RANKING_CHAIN; rules,
    # calibration and MMR are configured off) run inside top_k
    (("ranking",  "infermesh.ranking.top_k"),           ("ranking",  "infermesh.ranking.seen_filter")),
    (("ranking",  "infermesh.ranking.top_k"),           ("ranking",  "infermesh.ranking.category_cap")),
]
# fmt: on
ROOT = ("envoy", "edge ingress")
SERVICES = {"envoy", "gateway", "features", "scoring", "ranking"}
USER = "u4242"  # asked for by no other request to this mesh: nothing of it is cached yet
CANDIDATES = [f"i{n}" for n in range(7, 40_000, 200)]  # 200 items


@dataclass
class Traced:
    mesh: Mesh
    receiver: OtlpReceiver


@pytest.fixture(scope="module")
def traced(
    reference_data: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Traced]:
    """A mesh of its own (not the shared one: that one exports nowhere) exporting to our receiver."""
    workdir = tmp_path_factory.mktemp("traced-mesh")
    receiver = OtlpReceiver(TraceStore()).start()
    mesh = Mesh(
        topology=free_topology({}),
        data_dir=workdir,
        redis_url=redis_server.url,
        model_repository=model_repository(reference_data),
        log_dir=workdir / "logs",
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        mesh.start(timeout=120)
        yield Traced(mesh, receiver)
    finally:
        mesh.stop()
        receiver.stop()


@dataclass
class Response:
    reply: gateway_pb2.RecommendResponse
    initial: dict[str, str]
    trailing: dict[str, str]
    trace: Trace


def _complete(trace: Trace) -> bool:
    return set(EXPECTED_EDGES) <= set(trace.edges())


@pytest.fixture(scope="module")
def response(traced: Traced) -> Response:
    with grpc.insecure_channel(f"127.0.0.1:{traced.mesh.topology.edge_port}") as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        reply, call = stub.Recommend.with_call(
            gateway_pb2.RecommendRequest(user_id=USER, candidate_ids=CANDIDATES, k=20), timeout=10
        )
        initial = {m.key: m.value for m in call.initial_metadata()}
        trailing = {m.key: m.value for m in call.trailing_metadata()}
    # Each process exports on its own schedule: wait until every expected span arrived.
    trace = traced.receiver.store.wait_for(reply.trace_id, _complete, timeout=30)
    assert trace is not None, f"no span of trace {reply.trace_id} reached the receiver"
    # A little longer for stragglers (e.g. an Envoy span exported in a later batch).
    time.sleep(1.0)
    trace = traced.receiver.store.get(reply.trace_id)
    assert trace is not None
    return Response(reply, initial, trailing, trace)


def test_one_trace_across_every_hop(response: Response) -> None:
    trace = response.trace
    assert len(response.reply.items) == 20
    assert len(response.reply.trace_id) == 32 and trace.trace_id == response.reply.trace_id
    edges = set(trace.edges())
    missing = [edge for edge in EXPECTED_EDGES if edge not in edges]
    unexpected = sorted(edges - set(EXPECTED_EDGES))
    assert not missing and not unexpected, (
        f"missing edges: {missing}\nunexpected edges: {unexpected}\nspans:\n"
        + "\n".join(f"{'  ' * d}{s.service} | {s.name}" for d, s in trace.walk())
    )
    assert [s.label for s in trace.roots()] == [ROOT]  # one tree: no hop lost the context
    assert set(trace.services) == SERVICES
    assert len(trace.spans) >= 18, len(trace.spans)


def test_only_requests_are_traced(traced: Traced, response: Response) -> None:
    # Health probes (Envoy's, the gateway's readiness checks through Envoy every second, the
    # supervisor's) and background work (feature pointer refreshes) start no traces.
    time.sleep(2.5)
    roots = {trace.root.label for trace in traced.receiver.store.traces() if trace.root is not None}
    assert roots == {ROOT}, roots


def test_span_kinds_and_attributes(response: Response) -> None:
    spans = {(s.service, s.name, s.kind): s for s in response.trace.spans}
    for service, name in (
        (("gateway", RECOMMEND)),
        ("features", GET_FEATURES),
        ("scoring", MODEL_INFER),
        ("ranking", RANK),
    ):
        assert (service, name, "SERVER") in spans, (service, name)
    for name in (GET_FEATURES, MODEL_INFER, RANK):
        # each stage call carries the budget the gateway gave it (its timeout)
        assert spans[("gateway", name, "CLIENT")].attributes["infermesh.deadline.remaining_ms"] > 0
    assert spans[("ranking", RANK, "SERVER")].attributes["infermesh.items"] == len(CANDIDATES)
    assert spans[("envoy", "edge ingress", "SERVER")].attributes["upstream_cluster"] == "gateway"
    assert spans[("envoy", "router scoring egress", "CLIENT")].attributes["upstream_cluster"] == "scoring"

    (queue,) = [s for s in response.trace.spans if s.name == "infermesh.scoring.queue"]
    (inference,) = [s for s in response.trace.spans if s.name == "infermesh.scoring.inference"]
    assert queue.attributes["infermesh.batch.size"] >= len(CANDIDATES)
    assert isinstance(queue.attributes["infermesh.batch.id"], int)
    assert inference.attributes["infermesh.batch.id"] == queue.attributes["infermesh.batch.id"]
    assert inference.attributes["infermesh.model.name"] == "ranker"
    assert inference.attributes["infermesh.model.version"] == response.reply.model_version == "1"
    assert inference.attributes["infermesh.execution_provider"].endswith("ExecutionProvider")
    assert queue.end_ns <= inference.start_ns + 1_000_000  # the wait comes before the run

    (mget,) = [s for s in response.trace.spans if s.name == "MGET"]
    assert mget.kind == "CLIENT"
    assert mget.attributes["db.system.name"] == "redis" and mget.attributes["db.operation.name"] == "MGET"
    assert mget.attributes["infermesh.features.keys"] >= 1 + len(CANDIDATES)  # the user and every item
    (lookup,) = [s for s in response.trace.spans if s.name == "infermesh.features.cache_lookup"]
    assert lookup.attributes["infermesh.cache.hit"] is False  # first sight of this user

    stages = [s for s in response.trace.spans if s.name.startswith("infermesh.ranking.")]
    assert {s.name for s in stages} == {
        "infermesh.ranking.top_k",
        "infermesh.ranking.seen_filter",
        "infermesh.ranking.category_cap",
    }
    assert not response.trace.has_error


def test_trace_id_in_response_header_and_metadata(traced: Traced, response: Response) -> None:
    trace_id = response.reply.trace_id
    assert response.initial.get("x-trace-id") == trace_id  # Envoy's response header
    assert response.trailing.get("x-trace-id") == trace_id  # the gateway's trailer
    body = json.dumps({"user_id": "u7", "candidate_ids": ["i1", "i2", "i3"], "k": 2}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{traced.mesh.topology.edge_port}/v1/recommend",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        header = reply.headers["x-trace-id"]
        assert header == json.loads(reply.read())["trace_id"] and len(header) == 32


def test_logs_name_the_same_trace(traced: Traced, response: Response) -> None:
    trace_id = response.reply.trace_id
    log_dir = traced.mesh.log_dir
    spans = {(s.service, s.name, s.kind): s for s in response.trace.spans}
    for service, method in (
        ("gateway", RECOMMEND),
        ("features", GET_FEATURES),
        ("scoring", MODEL_INFER),
        ("ranking", RANK),
    ):
        lines = [
            line
            for line in json_log_lines(log_dir / f"{service}-0.log")
            if line.get("message") == "rpc" and line.get("trace_id") == trace_id
        ]
        assert len(lines) == 1, (service, lines)
        (line,) = lines
        assert line["grpc_method"] == method and line["grpc_code"] == "OK" and line["level"] == "info"
        assert line["span_id"] == spans[(service, method, "SERVER")].span_id  # log -> exact span
        assert line["duration_ms"] > 0
    deadline = time.monotonic() + 10  # Envoy flushes its access log every second
    while True:
        access = [line for line in json_log_lines(log_dir / "envoy.log") if line.get("trace_id") == trace_id]
        if len(access) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    # The edge request and the three internal hops, each with the same trace id.
    assert sorted(line["upstream_cluster"] for line in access) == ["features", "gateway", "ranking", "scoring"]


def test_metrics_exemplars_link_to_traces(traced: Traced, response: Response) -> None:
    # Each bucket keeps its latest exemplar: every one must name a trace the receiver holds.
    for replica in ("gateway-0", "features-0", "scoring-0", "ranking-0"):
        port = traced.mesh.metrics_ports[replica]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            text = reply.read().decode()
        service = replica.split("-")[0]
        assert "grpc_server_handling_seconds_bucket" in text
        exemplars = set(
            re.findall(r'grpc_server_handling_seconds_bucket\{[^}]*\} \S+ # \{[^}]*trace_id="([0-9a-f]{32})"', text)
        )
        assert exemplars, (replica, text[-2000:])
        for trace_id in exemplars:  # (spans are exported in batches: allow a moment)
            trace = traced.receiver.store.wait_for(trace_id, lambda t, s=service: s in t.services, timeout=10)
            assert trace is not None and service in trace.services, (replica, trace_id)


# --------------------------------------------------------------------------- trace view


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("headless Chromium is needed for the trace view test: `sudo apt-get install -y chromium`")


def _headless(url: str, user_data: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={user_data}",
        "--window-size=1600,1000",
        *extra,
        url,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(user_data)}
    )


def test_trace_view_shows_the_waterfall_in_chromium(traced: Traced, response: Response, tmp_path: Path) -> None:
    from PIL import Image

    trace = response.trace
    ARTIFACTS.mkdir(exist_ok=True)
    with TraceView(traced.receiver.store, port=0) as view:
        url = view.trace_url(trace.trace_id)
        dom = _headless(url, tmp_path / "profile-dom", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        # The waterfall as the browser built it: one row per span, every hop's service.
        assert dom.stdout.count("<details>") == len(trace.spans), dom.stdout[:2000]
        for service, name in [ROOT, *(child for _, child in EXPECTED_EDGES)]:
            assert f'title="{service}: {name}"' in dom.stdout, (service, name)

        screenshot = ARTIFACTS / "trace-view-waterfall.png"
        screenshot.unlink(missing_ok=True)
        shot = _headless(url, tmp_path / "profile-shot", f"--screenshot={screenshot}")
        assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
        listing = ARTIFACTS / "trace-view-slowest.png"
        listing.unlink(missing_ok=True)
        shot = _headless(view.url + "/", tmp_path / "profile-list", f"--screenshot={listing}")
        assert shot.returncode == 0 and listing.is_file(), shot.stderr[-2000:]

    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1600, 1000)
    colours = set(image.get_flattened_data() if hasattr(image, "get_flattened_data") else image.getdata())
    # The bars are drawn: every hop's service colour is on the screen.
    for service in SERVICES:
        rgb = tuple(int(SERVICE_COLOURS[service][i : i + 2], 16) for i in (1, 3, 5))
        assert any(all(abs(a - b) <= 12 for a, b in zip(rgb, pixel, strict=True)) for pixel in colours), service


STAGE_OF_SERVICE = {"FeatureService": "features", "GRPCInferenceService": "scoring", "RankingService": "ranking"}


def _stages(trace: Trace) -> set[str]:
    """Stages a request's trace shows from the gateway: its own call's CLIENT span, or the
    span of its wait in a coalesced call."""
    stages = set()
    for span in trace.spans:
        if span.service != "gateway":
            continue
        if span.name == "infermesh.gateway.coalesced":
            stages.add(span.attributes["infermesh.stage"])
        elif span.kind == "CLIENT":
            stages.update(stage for service, stage in STAGE_OF_SERVICE.items() if f".{service}/" in span.name)
    return stages


def test_coalesced_requests_link_to_their_batch_and_keep_every_stage(traced: Traced, response: Response) -> None:
    async def burst() -> list[gateway_pb2.RecommendResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{traced.mesh.topology.edge_port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            return await asyncio.gather(
                *(
                    stub.Recommend(
                        gateway_pb2.RecommendRequest(user_id=f"u{n}", candidate_ids=CANDIDATES, k=5), timeout=10
                    )
                    for n in range(24)
                )
            )

    replies = asyncio.run(burst())
    store = traced.receiver.store
    deadline = time.monotonic() + 30
    while True:
        traces = [t for t in (store.get(r.trace_id) for r in replies) if t is not None]
        spans = [s for t in traces for s in t.spans]
        batches = {s.span_id: s for s in spans if s.name == "infermesh.gateway.batch"}
        linked = [
            s for s in spans if s.name == "infermesh.gateway.coalesced" and any(link[1] in batches for link in s.links)
        ]
        complete = len(traces) == len(replies) and all(_stages(t) == {"features", "scoring", "ranking"} for t in traces)
        if (linked and complete) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert linked, "no coalesced request's span links to a batch span"
    assert complete, [sorted(_stages(t)) for t in traces]
    wait = linked[0]
    batch = batches[next(link[1] for link in wait.links if link[1] in batches)]
    assert (wait.trace_id, wait.span_id) in batch.links  # and back
    assert batch.attributes["infermesh.batch.requests"] >= 2 and wait.attributes["infermesh.coalesce.wait_ms"] >= 0
    # The batched call itself is one CLIENT span under the batch span.
    children = store.get(batch.trace_id).children().get(batch.span_id, [])
    assert [c.kind for c in children] == ["CLIENT"]
