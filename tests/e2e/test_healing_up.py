"""`infermesh up` heals, as a user runs it: under light load, a SIGKILLed scoring replica and
the only ranking replica are started again (new pid, SERVING) while no request fails (the
other scoring replica carries the load; without ranking the gateway answers with its
fallback, flagged degraded); `infermesh status` shows the restarts; and a replica that
cannot start again (its metrics port taken) crash-loops, which stops the mesh with a
message naming it and the tail of its log.

Loopback only; the load is 15 requests/s while the replicas are down, a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.bench.targets import reference_requests
from infermesh.up.runfile import MeshProcess, read_run_file
from infermesh.up.supervisor import free_port
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.topology import HEALTH_SERVICE_NAMES
from tests.conftest import RedisServer
from tests.processes import alive, descendants, metric, start_up

pytestmark = pytest.mark.timeout(300)

RATE = 15.0  # requests/s while the replicas are down
METRICS_PORT_OFFSET = 1000  # `up`'s default: a replica's /metrics is on its gRPC port + this
MAX_RESTARTS = 3  # `up --max-restarts`: the crash loop is declared after 3 restarts, in seconds
BACK_WITHIN_S = 60.0  # a bound on waiting, not a measurement: the figures are printed


@dataclass
class Up:
    process: subprocess.Popen[str]
    data_dir: Path
    edge: int
    supervisor_metrics: int  # up's own /metrics
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None  # appends `up`'s output to lines until it exits

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def processes(self) -> dict[str, MeshProcess]:
        return {p.name: p for p in read_run_file(self.data_dir).processes}


def _read_lines(up: Up) -> None:
    assert up.process.stdout is not None
    for line in up.process.stdout:
        up.lines.append(line)


@pytest.fixture(scope="module")
def up(redis_server: RedisServer, reference_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data_dir = tmp_path_factory.mktemp("healing") / "data"
    shutil.copytree(reference_data / "models", data_dir / "models")  # skip retraining
    edge, supervisor_metrics = free_port(), free_port()
    process = start_up(
        data_dir,
        redis_server.url,
        edge,
        "--metrics-port-offset",
        str(METRICS_PORT_OFFSET),
        "--replicas",
        "scoring=2",
        "--max-restarts",
        str(MAX_RESTARTS),
        "--supervisor-metrics-port",
        str(supervisor_metrics),
        env={"LOG_LEVEL": "WARNING"},
    )
    running = Up(process, data_dir, edge, supervisor_metrics)
    running.reader = threading.Thread(target=_read_lines, args=(running,), daemon=True)
    running.reader.start()
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in running.output:
            assert process.poll() is None and time.monotonic() < deadline, running.output
            time.sleep(0.2)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serving(address: str, service: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[service]), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def back_again(up: Up, victim: MeshProcess) -> float:
    """Seconds until the replica runs under a new pid and reports SERVING."""
    started = time.monotonic()
    while time.monotonic() - started < BACK_WITHIN_S:
        now = up.processes().get(victim.name)
        if now is not None and now.pid != victim.pid and alive(now.pid):
            assert now.address is not None
            if await asyncio.to_thread(serving, now.address, victim.role):
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"{victim.name} not back within {BACK_WITHIN_S:g} s:\n{up.output}")


@dataclass
class Load:
    answered: int = 0
    degraded: int = 0
    failures: list[str] = field(default_factory=list)


async def kill_under_load(up: Up, victims: list[MeshProcess]) -> tuple[Load, dict[str, float]]:
    load = Load()
    stop = asyncio.Event()
    requests = [
        gateway_pb2.RecommendRequest(user_id=r["user_id"], candidate_ids=r["candidate_ids"], k=r["k"])
        for r in reference_requests(count=50, candidates=50, k=10)
    ]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{up.edge}", options=[("grpc.enable_retries", 0)])
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)

    async def one(n: int) -> None:
        try:
            reply = await stub.Recommend(requests[n % len(requests)], timeout=5.0)
        except grpc.aio.AioRpcError as error:
            load.failures.append(f"{error.code().name}: {error.details()}")
            return
        load.answered += 1
        load.degraded += reply.degraded

    async def steady() -> None:
        sent: set[asyncio.Task[None]] = set()
        n = 0
        while not stop.is_set():
            task = asyncio.create_task(one(n))
            sent.add(task)
            task.add_done_callback(sent.discard)
            n += 1
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*sent)

    async def faults() -> dict[str, float]:
        await asyncio.sleep(1.0)
        for victim in victims:
            os.kill(victim.pid, signal.SIGKILL)
        seconds = await asyncio.gather(*(back_again(up, v) for v in victims))
        await asyncio.sleep(1.0)  # and serving through them
        stop.set()
        return {v.name: round(s, 2) for v, s in zip(victims, seconds, strict=True)}

    try:
        _, back = await asyncio.gather(steady(), faults())
    finally:
        await channel.close()
    return load, back


def test_killed_replicas_come_back_and_no_request_fails(up: Up) -> None:
    before = up.processes()
    victims = [before["scoring-1"], before["ranking-0"]]
    load, back = asyncio.run(kill_under_load(up, victims))
    print(f"back after {back} s; {load.answered} answered ({load.degraded} degraded), {len(load.failures)} failed")
    assert load.failures == [], load.failures[:10]
    assert load.answered >= RATE * 2  # it was load, not a trickle

    for victim in victims:
        assert f"{victim.name} (pid {victim.pid}) killed by SIGKILL; starting it again in 0.5 s (restart 1" in up.output
        assert f"{victim.name}: SERVING again" in up.output
    after = up.processes()
    assert after["scoring-0"].pid == before["scoring-0"].pid  # the other replicas kept running
    assert after["gateway-0"].pid == before["gateway-0"].pid

    done = subprocess.run(
        [sys.executable, "-m", "infermesh", "status", "--data-dir", str(up.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    pipeline = {"envoy", "gateway-0", "features-0", "scoring-0", "scoring-1", "ranking-0"}
    # The jobs' bulk lane (`--workers 1`, the default): the same replicas and an Envoy of its own.
    lane = {"envoy-bulk", "gateway-bulk-0", "features-bulk-0", "scoring-bulk-0", "scoring-bulk-1", "ranking-bulk-0"}
    assert set(rows) == pipeline | lane | {"jobs-0", "jobs-worker-0"}, done.stdout
    for victim in victims:
        _, _, pid, is_alive, _, restarts, *last_exit = rows[victim.name]
        assert (pid, is_alive, restarts, " ".join(last_exit)) == (
            str(after[victim.name].pid),
            "yes",
            "1",
            "killed by SIGKILL",
        ), done.stdout
    assert rows["scoring-0"][3:] == ["yes", before["scoring-0"].address, "0", "-"]
    # ... and up's own /metrics counts the same restarts.
    for victim in victims:
        labels = {"replica": victim.name}
        assert metric(up.supervisor_metrics, "infermesh_replica_restarts_total", **labels) == 1
        assert metric(up.supervisor_metrics, "infermesh_replica_up", **labels) == 1
    assert metric(up.supervisor_metrics, "infermesh_replica_restarts_total", replica="scoring-0") == 0


def test_a_replica_that_keeps_crashing_stops_the_mesh_with_its_log(up: Up) -> None:
    victim = up.processes()["scoring-0"]
    assert victim.address is not None
    started = descendants(up.process.pid)
    metrics_port = int(victim.address.rsplit(":", 1)[1]) + METRICS_PORT_OFFSET
    os.kill(victim.pid, signal.SIGKILL)
    # Once `up` says so it has reaped the process (all its threads gone, its ports free); the
    # first restart is 0.5 s later. The port taken now makes every start fail from then on.
    reaped = f"scoring-0 (pid {victim.pid}) killed by SIGKILL"
    deadline = time.monotonic() + 30
    while reaped not in up.output:
        assert time.monotonic() < deadline, up.output
        time.sleep(0.01)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", metrics_port))
        squatter.listen()
        up.process.wait(timeout=120)
    assert up.reader is not None
    up.reader.join(timeout=10)
    output = up.output
    assert up.process.returncode == 1, output
    assert f"scoring-0 is crash-looping: it exited with code 1 again after {MAX_RESTARTS} restarts" in output
    assert f"scoring-0| scoring: cannot serve metrics on 127.0.0.1:{metrics_port}" in output  # its log's tail
    assert output.count("scoring-0: started again") == MAX_RESTARTS
    assert "stopped." in output
    leftovers = [pid for pid in started if alive(pid)]
    assert not leftovers, f"processes left behind: {leftovers}"
