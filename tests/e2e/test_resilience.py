"""Acceptance: SIGKILL one of two scoring replicas under steady load, through a real mesh.

A mesh of this module's own (real Envoy, gateway, features, ranking, two ONNX Runtime
scoring replicas; a small catalog in a Redis database of its own) serves a bounded load
of concurrent Recommend calls through the edge. Mid-run scoring-1 is killed with SIGKILL,
then started again on the same port. Expected:

* zero failed Recommend requests, and none degraded: the gateway never saw a scoring
  failure (it has fallbacks that would hide one), because Envoy retried the calls that hit
  the dead replica on the live one (cluster.scoring.upstream_rq_retry);
* the killed replica is ejected (outlier detection, then the active health check);
* after the restart it is readmitted and serves traffic again (its upstream request count
  in Envoy grows, and the new process's ModelStatistics count inferences).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from infermesh.up.supervisor import Mesh
from services.genproto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.topology import SCORING
from tests.conftest import SMALL_CATALOG, RedisServer, running_mesh, seed_small

pytestmark = pytest.mark.timeout(300)

SEED = 11
REDIS_DB = 11  # a database of its own on the session's test Redis
K = 10
CONCURRENCY = 8
# Bounds: loopback only; the load stops by itself after this many requests or seconds.
MAX_REQUESTS = 50_000
MAX_SECONDS = 25.0
KILL_AT_S = 2.0
DEAD_FOR_S = 3.0
AFTER_RETURN_S = 3.0  # load kept up this long once the replica is healthy again
VICTIM = "scoring-1"


@pytest.fixture(scope="module")
def resilient_mesh(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("resilience")
    url = redis_server.url_for(REDIS_DB)
    seed_small(workdir, url, SEED, force=True)
    with running_mesh(workdir, url, {SCORING: 2}) as mesh:
        yield mesh


# --------------------------------------------------------------------------- Envoy admin


def admin(mesh: Mesh, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.topology.admin_port}{path}", timeout=5) as reply:
        return reply.read().decode()


def host_stats(mesh: Mesh, port: int) -> dict[str, str]:
    """admin /clusters for one scoring host: health_flags, rq_total, rq_success..."""
    out = {}
    for line in admin(mesh, "/clusters").splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == SCORING and parts[1] == f"127.0.0.1:{port}":
            out[parts[2]] = parts[3]
    return out


def cluster_counters(mesh: Mesh) -> dict[str, int]:
    out = {}
    prefix = f"cluster.{SCORING}."
    for line in admin(mesh, f"/stats?filter=^cluster\\.{SCORING}\\.").splitlines():
        name, sep, value = line.partition(": ")
        if sep and name.startswith(prefix) and value.strip().isdigit():
            out[name[len(prefix) :]] = int(value)
    return out


# --------------------------------------------------------------------------- load


@dataclass
class Run:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    # Seen in /clusters while the victim was down, e.g. "/failed_active_hc/failed_outlier_check".
    victim_flags: set[str] = field(default_factory=set)
    marks: dict[str, float] = field(default_factory=dict)
    victim_rq_at_return: int = 0


def _requests() -> list[gateway_pb2.RecommendRequest]:
    return [
        gateway_pb2.RecommendRequest(
            user_id=f"u{u}", candidate_ids=[f"i{(u * 131 + n * 17) % 3_000}" for n in range(100)], k=K
        )
        for u in range(SMALL_CATALOG["n_users"])
    ]


async def kill_and_restart_under_load(mesh: Mesh) -> Run:
    run = Run()
    victim_port = mesh.topology.replicas[SCORING][1].port
    requests = _requests()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.topology.edge_port}")
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    started = time.monotonic()
    hard_stop = started + MAX_SECONDS
    sent = 0

    def done() -> bool:
        back = run.marks.get("healthy_again")
        return (
            time.monotonic() > hard_stop
            or sent >= MAX_REQUESTS
            or (back is not None and time.monotonic() > back + AFTER_RETURN_S)
        )

    async def worker(offset: int) -> None:
        nonlocal sent
        n = offset
        while not done():
            sent += 1
            request = requests[n % len(requests)]
            n += CONCURRENCY
            try:
                reply = await stub.Recommend(request, timeout=5.0)
            except grpc.aio.AioRpcError as error:
                run.failures.append(f"{time.monotonic() - started:.2f}s {error.code().name}: {error.details()}")
                continue
            reasons = list(getattr(reply, "degraded_reasons", []))
            if reply.degraded or reasons or len(reply.items) != K:
                run.degraded.append(f"{time.monotonic() - started:.2f}s degraded={reply.degraded} {reasons}")
            else:
                run.ok += 1

    async def chaos() -> None:
        await asyncio.sleep(KILL_AT_S)
        victim = mesh.replica(VICTIM)
        victim.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.process.wait, 10)
        run.marks["killed"] = time.monotonic()
        dead_until = time.monotonic() + DEAD_FOR_S
        while time.monotonic() < dead_until:
            flags = (await asyncio.to_thread(host_stats, mesh, victim_port)).get("health_flags", "")
            run.victim_flags.update(f for f in flags.split("/") if f)
            await asyncio.sleep(0.1)
        mesh.respawn(VICTIM)
        run.marks["respawned"] = time.monotonic()
        while time.monotonic() < hard_stop:
            stats = await asyncio.to_thread(host_stats, mesh, victim_port)
            if stats.get("health_flags") == "healthy":
                run.marks["healthy_again"] = time.monotonic()
                run.victim_rq_at_return = int(stats["rq_success"])
                return
            await asyncio.sleep(0.1)

    await asyncio.gather(chaos(), *(worker(i) for i in range(CONCURRENCY)))
    await channel.close()
    run.marks["end"] = time.monotonic()
    run.marks = {name: round(at - started, 2) for name, at in run.marks.items()}
    return run


def _inference_count(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            grpc_predict_v2_pb2.ModelStatisticsRequest(), timeout=5
        )
    return sum(stats.inference_count for stats in reply.model_stats)


def test_killing_a_scoring_replica_under_load_fails_nothing(resilient_mesh: Mesh) -> None:
    mesh = resilient_mesh
    survivor, victim = (e.port for e in mesh.topology.replicas[SCORING])
    before = cluster_counters(mesh)
    run = asyncio.run(kill_and_restart_under_load(mesh))
    after = cluster_counters(mesh)
    victim_now = host_stats(mesh, victim)
    summary = (
        f"{run.ok} ok, {len(run.failures)} failed, {len(run.degraded)} degraded; marks {run.marks}; "
        f"victim flags while dead {sorted(run.victim_flags)}; retries "
        f"{after.get('upstream_rq_retry', 0) - before.get('upstream_rq_retry', 0)}; ejections "
        f"{after.get('outlier_detection.ejections_enforced_total', 0)}; victim rq_success "
        f"{run.victim_rq_at_return} -> {victim_now.get('rq_success')}"
    )
    print(summary)
    assert run.failures == [], f"{summary}\n" + "\n".join(run.failures[:10])
    assert run.degraded == [], f"{summary}\n" + "\n".join(run.degraded[:10])
    assert run.ok >= 100, summary  # it was load, not a trickle
    assert "healthy_again" in run.marks, f"the restarted replica never became healthy: {summary}"

    # Envoy did the work: the calls that hit the dead replica were retried on the other one.
    assert after["upstream_rq_retry"] > before.get("upstream_rq_retry", 0), summary
    assert after["upstream_rq_retry_success"] > before.get("upstream_rq_retry_success", 0), summary
    # The dead replica was ejected: by outlier detection within a couple of failed calls,
    # and by the active health check (its flags while it was down).
    assert after["outlier_detection.ejections_enforced_total"] > before.get(
        "outlier_detection.ejections_enforced_total", 0
    ), summary
    assert run.victim_flags & {"failed_active_hc", "failed_outlier_check"}, summary

    # Traffic returned to it after the restart: Envoy sent it requests that succeeded...
    assert int(victim_now["rq_success"]) - run.victim_rq_at_return >= 20, summary
    # ...and the new process served them (its own statistics start from zero).
    assert _inference_count(victim) > 0
    assert _inference_count(survivor) > 0


def test_the_mesh_still_answers_rest_after_the_chaos(resilient_mesh: Mesh) -> None:
    body = json.dumps({"user_id": "u1", "candidate_ids": [f"i{n}" for n in range(50)], "k": 5}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{resilient_mesh.topology.edge_port}/v1/recommend",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        payload = json.loads(reply.read())
    assert len(payload["items"]) == 5 and not payload["degraded"]
