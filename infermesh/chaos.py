"""`infermesh chaos`: faults under open-loop load against a mesh of its own, and what users saw.

    infermesh chaos                         # every scenario, about 3 minutes, 60 requests/s
    infermesh chaos --short                 # CI: the scenarios the mesh must pass, under a minute
    infermesh chaos --only kill-scoring,redis-hang --json chaos.json

Starts a redis-server and an `infermesh up` of its own on free ports, loopback only (never
the user's mesh; the model and candidate index come from --data-dir, trained there if
absent). Each scenario waits for every replica to be SERVING and healthy in Envoy, runs
Poisson arrivals of the reference Recommend request (200 candidates, k=20) through the
edge over gRPC with no client retry, injects its fault, and prints a row: requests sent,
failed (any error status), degraded (answered with a fallback, RecommendResponse.degraded),
p50/p99 from each request's intended send time, and the time to recover: from the fault
(a kill) or its end (SIGCONT, the overload's end) until the faulted process serves again and
the last failed or degraded answer (for overload: or one slower than SLOW_MS) came back.

--short exits 1 when a scenario loses a request it must not: a failed request where a
replica was killed, a 5xx for a bad input. The full run only reports (docs/reliability.md).
Exit status 2: the suite could not run (the mesh did not come up, or `up` stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.bench.loadgen import RunResult, open_loop
from infermesh.bench.report import machine
from infermesh.bench.targets import RequestFailed, reference_requests
from infermesh.cli_help import CommandParser
from infermesh.settings import add_data_dir_argument
from infermesh.up.runfile import MeshProcess, alive, read_run_file
from infermesh.up.supervisor import MeshError, free_port, free_port_block, start_redis
from infermesh.workload.seed import SeedError, seed_all
from services.genproto.infermesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.runtime.event_loop import event_loop_runner
from services.runtime.topology import FEATURES, GATEWAY, HEALTH_SERVICE_NAMES, RANKING, SCORING

# Two of each service the gateway cannot answer without (itself, features) and of scoring,
# one ranking: a rolling restart can then keep answering, and killing ranking shows its
# fallback.
DEFAULT_REPLICAS = {GATEWAY: 2, FEATURES: 2, SCORING: 2, RANKING: 1}
DEFAULT_RATE = 60.0
REQUEST_TIMEOUT_S = 5.0
FAULT_AT_S = 2.0  # load runs this long before each fault
SLOW_MS = 200.0  # overload: an answer slower than this has not recovered yet
BACK_WITHIN_S = 60.0  # a killed replica not serving again by then is reported as never back
ROLL_ORDER = (FEATURES, SCORING, RANKING, GATEWAY)


class ChaosError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ the mesh


class ChaosMesh:
    """A redis-server and `infermesh up` of the suite's own, and the levers to hurt them."""

    def __init__(self, work: Path, source: Path, replicas: dict[str, int], up_args: Sequence[str] = ()) -> None:
        self.work = work
        self.source = source
        self.replicas = replicas
        self.up_args = list(up_args)
        self.data_dir = work / "mesh"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.edge_port = free_port()
        self.admin_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.up: subprocess.Popen[bytes] | None = None
        self.up_log = work / "up.log"

    def start(self) -> None:
        self.redis = start_redis(self.work, self.redis_port, self.work / "logs", persist=False)
        print(f"seeding the reference workload into a private Redis ({self.redis_url})", flush=True)
        seed_all(self.source, self.redis_url, progress=sys.stderr.isatty())
        self.data_dir.mkdir(parents=True)
        for name in ("models", "index"):  # trained and built once, in --data-dir
            (self.data_dir / name).symlink_to((self.source / name).resolve())
        replicas = ",".join(f"{name}={count}" for name, count in self.replicas.items())
        argv = [
            sys.executable,
            "-m",
            "infermesh.cli",
            "up",
            "--data-dir",
            str(self.data_dir),
            "--redis-url",
            self.redis_url,
            "--edge-port",
            str(self.edge_port),
            "--admin-port",
            str(self.admin_port),
            "--port-base",
            str(free_port_block(1500)),
            "--replicas",
            replicas,
            "--timeout",
            "180",
            *self.up_args,
        ]
        # No trace export from the shell's environment: the figures are of the mesh alone.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
        env.update(PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING")
        print(f"starting `infermesh up` ({replicas}); its output: {self.up_log}", flush=True)
        with open(self.up_log, "wb") as log:
            self.up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 240
        while "Ctrl-C stops everything" not in self.up_log.read_text(errors="replace"):
            self.check_up()
            if time.monotonic() > deadline:
                raise ChaosError(f"the mesh did not come up in 240 s:\n{self.up_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.up.kill()
                self.up.wait()
        if self.redis is not None and self.redis.poll() is None:
            os.kill(self.redis.pid, signal.SIGCONT)  # in case a scenario left it stopped
            self.redis.terminate()
            self.redis.wait(timeout=10)

    def up_tail(self, lines: int = 30) -> str:
        return "\n".join(self.up_log.read_text(errors="replace").splitlines()[-lines:])

    def check_up(self) -> None:
        if self.up is not None and self.up.poll() is not None:
            raise ChaosError(f"`infermesh up` exited with {self.up.returncode}:\n{self.up_tail()}")

    @property
    def edge(self) -> str:
        return f"127.0.0.1:{self.edge_port}"

    def processes(self) -> dict[str, MeshProcess]:
        return {p.name: p for p in read_run_file(self.data_dir).processes}

    def service_replicas(self) -> list[MeshProcess]:
        return [p for p in self.processes().values() if p.address is not None]

    # ---- health ---------------------------------------------------------------------
    async def serving(self, process: MeshProcess) -> bool:
        assert process.address is not None
        async with grpc.aio.insecure_channel(process.address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=HEALTH_SERVICE_NAMES[process.role]), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def envoy_unhealthy(self) -> list[str]:
        """Hosts Envoy does not route to now (admin /clusters), e.g. 'scoring 127.0.0.1:30301'."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=5) as reply:
            text = reply.read().decode()
        hosts = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[2] == "health_flags":
                hosts[f"{parts[0]} {parts[1]}"] = parts[3]
        return [host for host, flags in hosts.items() if flags != "healthy"]

    async def back_again(self, name: str, old_pid: int | None, within: float = BACK_WITHIN_S) -> float | None:
        """perf_counter time at which replica `name` (under a pid other than `old_pid`) is
        SERVING and healthy in Envoy; None if not within `within` seconds."""
        deadline = time.perf_counter() + within
        while time.perf_counter() < deadline:
            self.check_up()
            process = self.processes().get(name)
            if process is not None and process.pid != old_pid and alive(process.pid) and await self.serving(process):
                unhealthy = await asyncio.to_thread(self.envoy_unhealthy)
                if not any(host.endswith(f" {process.address}") for host in unhealthy):
                    return time.perf_counter()
            await asyncio.sleep(0.05)
        return None

    async def wait_all_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        waiting: list[str] = []
        while time.monotonic() < deadline:
            self.check_up()
            replicas = self.service_replicas()
            states = await asyncio.gather(*(self.serving(p) for p in replicas))
            waiting = [p.name for p, ok in zip(replicas, states, strict=True) if not ok]
            waiting += await asyncio.to_thread(self.envoy_unhealthy)
            if not waiting and await asyncio.to_thread(self.redis_answers):
                return
            await asyncio.sleep(0.2)
        raise ChaosError(
            f"the mesh is not healthy after {timeout:g} s: {', '.join(waiting) or 'redis'}\n{self.up_tail()}"
        )

    # ---- redis ----------------------------------------------------------------------
    def redis_answers(self) -> bool:
        import redis

        try:
            with redis.Redis.from_url(self.redis_url, socket_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def redis_save(self) -> None:
        """A dump for the restarted server to load (the suite's Redis saves nothing by itself)."""
        import redis

        with redis.Redis.from_url(self.redis_url) as client:
            client.save()

    def redis_kill_and_start(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait()
        self.redis = start_redis(self.work, self.redis_port, self.work / "logs", persist=False)


# ------------------------------------------------------------------------------ load


@dataclass
class Answer:
    done_at: float  # perf_counter
    seconds: float  # from the call's start
    failed: bool
    degraded: bool
    reasons: tuple[str, ...] = ()  # RecommendResponse.degraded_reasons: which fallback answered


class Recorder:
    """A Recommend call for open_loop that also keeps each answer's time and kind."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayServiceStub, requests: list[gateway_pb2.RecommendRequest]) -> None:
        self.stub = stub
        self.requests = requests
        self.answers: list[Answer] = []
        self.error_samples: dict[str, str] = {}  # status -> the first message seen with it

    async def call(self, n: int) -> object:
        started = time.perf_counter()
        try:
            reply = await self.stub.Recommend(self.requests[n % len(self.requests)], timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            now = time.perf_counter()
            self.answers.append(Answer(now, now - started, True, False))
            self.error_samples.setdefault(error.code().name, (error.details() or "")[:200])
            raise RequestFailed(error.code().name, error.details() or "") from None
        now = time.perf_counter()
        self.answers.append(Answer(now, now - started, False, bool(reply.degraded), tuple(reply.degraded_reasons)))
        return reply


@dataclass
class Fault:
    """What a scenario's fault did: times are perf_counter."""

    ended_at: float | None = None  # the kill, SIGCONT, the overload's end; None: nothing to recover from
    back_at: float | None = None  # the faulted process serving again
    never_back: bool = False
    notes: list[str] = field(default_factory=list)
    extra: list[RunResult] = field(default_factory=list)  # load the fault added (overload)
    bad_inputs: Counter[str] = field(default_factory=Counter)  # 2xx / 4xx / 5xx
    bad_input_ms: list[float] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


@dataclass
class Context:
    mesh: ChaosMesh
    recorder: Recorder
    rate: float
    started: float  # perf_counter when the load began
    seconds: float  # how long the load runs

    async def at(self, offset: float) -> None:
        """Sleep until `offset` seconds into the load."""
        await asyncio.sleep(max(0.0, self.started + offset - time.perf_counter()))


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    seconds: float  # of load; the fault may take longer
    fault: Callable[[Context], Awaitable[Fault]]
    must_not_fail: bool = False  # --short: a failed request is a regression
    slow_ms: float | None = None  # recovery also waits out answers slower than this
    prepare: Callable[[ChaosMesh], None] | None = None


@dataclass
class Row:
    scenario: str
    sent: int
    failed: int
    degraded: int
    p50_ms: float | None
    p99_ms: float | None
    recovered_s: float | None
    notes: str
    lost: bool  # lost a request it must not (--short fails)
    degraded_reasons: dict[str, int] = field(default_factory=dict)  # reason -> degraded answers giving it


# ------------------------------------------------------------------------------ faults


def kill(victim: str) -> Callable[[Context], Awaitable[Fault]]:
    async def fault(ctx: Context) -> Fault:
        await ctx.at(FAULT_AT_S)
        process = ctx.mesh.processes()[victim]
        os.kill(process.pid, signal.SIGKILL)
        killed = time.perf_counter()
        back = await ctx.mesh.back_again(victim, process.pid)
        note = f"{victim} back in {back - killed:.1f} s" if back else f"{victim} not back in {BACK_WITHIN_S:g} s"
        return Fault(killed, back, back is None, [note])

    return fault


def pause(victim: str, seconds: float) -> Callable[[Context], Awaitable[Fault]]:
    async def fault(ctx: Context) -> Fault:
        await ctx.at(FAULT_AT_S)
        process = ctx.mesh.processes()[victim]
        os.kill(process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        resumed = time.perf_counter()
        back = await ctx.mesh.back_again(victim, None)
        return Fault(resumed, back, back is None, [f"{victim} SIGSTOP for {seconds:g} s"])

    return fault


async def rolling_sigterm(ctx: Context) -> Fault:
    await ctx.at(FAULT_AT_S)
    # The pipeline's replicas (the jobs service, when `up` runs one, answers no Recommend).
    rolled = [p for p in ctx.mesh.service_replicas() if p.role in ROLL_ORDER]
    order = sorted(rolled, key=lambda p: (ROLL_ORDER.index(p.role), p.name))
    took: list[float] = []
    last_term, back = time.perf_counter(), None
    for process in order:
        os.kill(process.pid, signal.SIGTERM)
        last_term = time.perf_counter()
        back = await ctx.mesh.back_again(process.name, process.pid)
        if back is None:
            return Fault(last_term, None, True, [f"{process.name} not back in {BACK_WITHIN_S:g} s"])
        took.append(back - last_term)
    notes = [f"{len(order)} replicas, each back in {min(took):.1f}-{max(took):.1f} s"]
    if back is not None and back > ctx.started + ctx.seconds:
        notes.append("the roll outlasted the load")
    return Fault(last_term, back, False, notes)


def redis_pause(seconds: float) -> Callable[[Context], Awaitable[Fault]]:
    async def fault(ctx: Context) -> Fault:
        await ctx.at(FAULT_AT_S)
        assert ctx.mesh.redis is not None
        pid = ctx.mesh.redis.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        return Fault(time.perf_counter(), time.perf_counter(), False, [f"redis SIGSTOP for {seconds:g} s"])

    return fault


async def redis_restart(ctx: Context) -> Fault:
    await ctx.at(FAULT_AT_S)
    killed = time.perf_counter()
    await asyncio.to_thread(ctx.mesh.redis_kill_and_start)
    back = time.perf_counter()
    return Fault(
        killed, back, False, [f"redis SIGKILL, started again from its dump: answering in {back - killed:.1f} s"]
    )


def overload(factor: float, seconds: float) -> Callable[[Context], Awaitable[Fault]]:
    async def fault(ctx: Context) -> Fault:
        await ctx.at(FAULT_AT_S)
        extra = await open_loop(ctx.recorder.call, ctx.rate * (factor - 1), seconds, seed=7)
        began = ctx.started + FAULT_AT_S
        ended = began + seconds
        notes = [
            f"{factor:g}x ({ctx.rate * factor:g}/s) for {seconds:g} s",
            overload_figures(ctx.recorder, began, ended),
        ]
        return Fault(ended, ended, False, notes, [extra])

    return fault


def overload_figures(recorder: Recorder, began: float, ended: float) -> str:
    """Goodput (answers that came back during the overload, per second) and how fast the
    rejected requests were turned away (their p99, from their own send)."""
    during = [a for a in recorder.answers if began <= a.done_at < ended]
    goodput = sum(not a.failed for a in during) / max(ended - began, 1e-9)
    rejected = [a.seconds * 1000.0 for a in during if a.failed]
    text = f"answered {goodput:.0f}/s during it"
    if rejected:
        text += f", failed ones in p99 {float(np.percentile(rejected, 99)):.1f} ms"
    return text


# ------------------------------------------------------------------------------ bad inputs

GRPC_CLIENT_ERRORS = {
    "INVALID_ARGUMENT",
    "OUT_OF_RANGE",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "CANCELLED",
}
CANDIDATES = [f"i{n}" for n in range(200)]
GARBAGE = b"\xff\xfe{not json, not protobuf\x00\x01"
# Each input: a RecommendRequest as a dict, or raw bytes sent as the body / the message.
Inputs = dict[str, dict[str, Any] | bytes]


def oversized() -> Inputs:
    return {
        "user_id of 20,000 chars": {"user_id": "u" * 20_000, "candidate_ids": CANDIDATES, "k": 20},
        "user_id of 100,000 chars": {"user_id": "u" * 100_000, "candidate_ids": CANDIDATES, "k": 20},
        "10,001 candidates": {"user_id": "u42", "candidate_ids": [f"i{n}" for n in range(10_001)], "k": 20},
        "5 MB body": {"user_id": "u42", "candidate_ids": [f"item-{n:07d}-{'x' * 40}" for n in range(100_000)], "k": 20},
    }


def malformed() -> Inputs:
    return {
        "k=-1": {"user_id": "u42", "candidate_ids": CANDIDATES, "k": -1},
        "garbage bytes": GARBAGE,  # neither JSON nor a RecommendRequest
    }


BAD_INPUT_REPEATS = 3
# One bad input's outcome: (what it was and what came back, 2xx/4xx/5xx, seconds).
Outcome = tuple[str, str, float]


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 200 <= status < 600 else "5xx"


def grpc_class(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.OK:
        return "2xx"
    return "4xx" if code.name in GRPC_CLIENT_ERRORS else "5xx"


async def send_rest(edge: str, inputs: Inputs) -> list[Outcome]:
    import aiohttp

    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        for name, body in inputs.items():
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            for _ in range(BAD_INPUT_REPEATS):
                started = time.perf_counter()
                try:
                    async with session.post(
                        f"http://{edge}/v1/recommend", data=data, headers={"content-type": "application/json"}
                    ) as response:
                        await response.read()
                        outcome, kind = f"HTTP {response.status}", status_class(response.status)
                except (aiohttp.ClientError, TimeoutError) as error:
                    outcome, kind = f"no answer ({type(error).__name__})", "5xx"
                results.append((f"REST {name}: {outcome}", kind, time.perf_counter() - started))
    return results


async def send_grpc(edge: str, inputs: Inputs) -> list[Outcome]:
    results = []
    options = [("grpc.enable_retries", 0), ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(edge, options=options) as channel:
        # Bytes in, bytes out: a malformed message goes out as it is.
        call = channel.unary_unary("/infermesh.gateway.v1.GatewayService/Recommend")
        for name, body in inputs.items():
            message = body if isinstance(body, bytes) else gateway_pb2.RecommendRequest(**body).SerializeToString()
            for _ in range(BAD_INPUT_REPEATS):
                started = time.perf_counter()
                try:
                    await call(message, timeout=REQUEST_TIMEOUT_S)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                results.append((f"gRPC {name}: {code.name}", grpc_class(code), time.perf_counter() - started))
    return results


def bad_inputs(
    send: Callable[[str, Inputs], Awaitable[list[Outcome]]], inputs: Callable[[], Inputs]
) -> Callable[[Context], Awaitable[Fault]]:
    async def fault(ctx: Context) -> Fault:
        await ctx.at(1.0)
        found = Fault()
        for outcome, kind, seconds in await send(ctx.mesh.edge, inputs()):
            found.bad_inputs[kind] += 1
            found.bad_input_ms.append(seconds * 1000)
            if outcome not in found.details:
                found.details.append(outcome)
        return found

    return fault


# ------------------------------------------------------------------------------ scenarios


def scenarios(short: bool) -> list[Scenario]:
    """Every scenario; with `short`, the kills' load lasts 8 s instead of 12."""
    load = 8.0 if short else 12.0
    return [
        Scenario("kill-scoring", "SIGKILL 1 of 2 scoring replicas", load, kill("scoring-1"), must_not_fail=True),
        Scenario("kill-ranking", "SIGKILL the only ranking replica", load, kill("ranking-0"), must_not_fail=True),
        Scenario("stop-scoring", "SIGSTOP 1 scoring replica for 6 s", 14.0, pause("scoring-1", 6.0)),
        Scenario("rolling-sigterm", "rolling SIGTERM of every replica", 30.0, rolling_sigterm),
        Scenario("redis-hang", "Redis stopped (SIGSTOP) for 3 s", 10.0, redis_pause(3.0)),
        Scenario(
            "redis-restart",
            "Redis killed and started again",
            12.0,
            redis_restart,
            prepare=lambda mesh: mesh.redis_save(),
        ),
        Scenario("overload-3x", "overload: 3x the rate for 5 s", 12.0, overload(3, 5.0), slow_ms=SLOW_MS),
        Scenario("overload-8x", "overload: 8x the rate for 5 s", 12.0, overload(8, 5.0), slow_ms=SLOW_MS),
        Scenario("oversized-rest", "oversized inputs over REST", 5.0, bad_inputs(send_rest, oversized)),
        Scenario("oversized-grpc", "oversized inputs over gRPC", 5.0, bad_inputs(send_grpc, oversized)),
        Scenario("malformed-rest", "malformed inputs over REST", 5.0, bad_inputs(send_rest, malformed)),
        Scenario("malformed-grpc", "malformed inputs over gRPC", 5.0, bad_inputs(send_grpc, malformed)),
    ]


# --short, for CI: what the mesh must not regress on. Malformed inputs join once a garbage
# gRPC message gets a 4xx (today: UNKNOWN, from grpcio's failed deserialization).
SHORT = ("kill-scoring", "kill-ranking", "oversized-rest", "oversized-grpc")


def summarize(scenario: Scenario, run: RunResult, recorder: Recorder, fault: Fault) -> Row:
    results = [run, *fault.extra]
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.errors)
    dropped = sum(r.dropped for r in results)
    answered = sum(r.completed for r in results)
    latencies = np.concatenate([r.latencies_ms for r in results])
    sent = answered + sum(errors.values()) + dropped
    failed = sum(errors.values()) + dropped
    degraded = sum(a.degraded for a in recorder.answers)
    reasons = Counter(reason for a in recorder.answers for reason in a.reasons)
    notes = list(fault.notes)
    if reasons:
        notes.append("degraded: " + ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()))
    if errors:
        notes.append(
            "errors: "
            + ", ".join(
                f"{name} {count}" + (f" ({recorder.error_samples[name]!r})" if name in recorder.error_samples else "")
                for name, count in errors.most_common()
            )
        )
    if fault.bad_inputs:
        classes = ", ".join(
            f"{kind} {fault.bad_inputs[kind]}" for kind in ("2xx", "4xx", "5xx") if fault.bad_inputs[kind]
        )
        notes.append(f"bad inputs: {classes}; load beside them: {failed} of {sent} failed")
        sent, failed = sum(fault.bad_inputs.values()), fault.bad_inputs["5xx"] + failed
        latencies = np.asarray(fault.bad_input_ms)
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99)) if latencies.size else (None, None)
    lost = (scenario.must_not_fail and failed > 0) or fault.never_back or fault.bad_inputs["5xx"] > 0
    return Row(
        scenario.name,
        sent,
        failed,
        degraded,
        p50,
        p99,
        recovery(fault, recorder, scenario.slow_ms),
        "; ".join(notes),
        lost,
        dict(reasons),
    )


def recovery(fault: Fault, recorder: Recorder, slow_ms: float | None) -> float | None:
    if fault.ended_at is None or fault.never_back:
        return None
    bad = [
        a.done_at
        for a in recorder.answers
        if a.failed or a.degraded or (slow_ms is not None and a.seconds * 1000 > slow_ms)
    ]
    settled = max([fault.back_at or fault.ended_at, *bad])
    return max(0.0, settled - fault.ended_at)


async def run_scenario(mesh: ChaosMesh, scenario: Scenario, rate: float, seed: int) -> tuple[Row, list[str]]:
    await mesh.wait_all_healthy()
    if scenario.prepare is not None:
        await asyncio.to_thread(scenario.prepare, mesh)
    requests = [
        gateway_pb2.RecommendRequest(user_id=r["user_id"], candidate_ids=r["candidate_ids"], k=r["k"])
        for r in reference_requests()
    ]
    # No client retry: what the mesh absorbs itself is what is measured.
    async with grpc.aio.insecure_channel(mesh.edge, options=[("grpc.enable_retries", 0)]) as channel:
        recorder = Recorder(gateway_pb2_grpc.GatewayServiceStub(channel), requests)
        for n in range(5):  # connected before the clock starts
            with contextlib.suppress(RequestFailed):
                await recorder.call(n)
        recorder.answers.clear()
        recorder.error_samples.clear()
        context = Context(mesh, recorder, rate, time.perf_counter(), scenario.seconds)
        fault_task = asyncio.create_task(scenario.fault(context))
        run = await open_loop(recorder.call, rate, scenario.seconds, seed=seed)
        fault = await fault_task
    return summarize(scenario, run, recorder, fault), fault.details


# ------------------------------------------------------------------------------ report

HEAD = (
    "| scenario | sent | failed | degraded | p50 ms | p99 ms | recovered in | notes |\n"
    "|---|---|---|---|---|---|---|---|"
)


def format_row(row: Row) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    recovered = "-" if row.recovered_s is None else f"{row.recovered_s:.1f} s"
    if row.recovered_s is None and "not back" in row.notes:
        recovered = "never"
    return (
        f"| {row.scenario} | {row.sent} | {row.failed} | {row.degraded} | {ms(row.p50_ms)} | {ms(row.p99_ms)} "
        f"| {recovered} | {row.notes} |"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh chaos", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--short", action="store_true", help=f"CI: only {', '.join(SHORT)}, shorter; exit 1 on a lost request"
    )
    parser.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="steady open-loop requests/s (default %(default)s)"
    )
    parser.add_argument("--only", default=None, help="comma-separated scenario names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    add_data_dir_argument(parser, "where the reference model and index are (trained/built there if absent)")
    parser.add_argument("--replicas", default=None, help="e.g. gateway=2,features=2,scoring=2,ranking=1 (the default)")
    parser.add_argument(
        "--up-args",
        default="",
        help="more `infermesh up` options, e.g. '--edge-shed-latency 0' (load shedding off, to compare)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows, settings and machine here")
    parser.add_argument(
        "--keep", type=Path, default=None, help="work here and keep it (logs of `up` and every replica)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.rate <= 1000:
        raise SystemExit("--rate must be within (0, 1000]")
    chosen = [s for s in scenarios(args.short) if s.name in SHORT or not args.short]
    if args.list:
        for scenario in scenarios(False):
            print(f"{scenario.name:<16} {scenario.title}{'   (--short)' if scenario.name in SHORT else ''}")
        return 0
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {s.name: s for s in scenarios(args.short)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        chosen = [known[n] for n in names]
    replicas = dict(DEFAULT_REPLICAS)
    if args.replicas:
        from infermesh.envoy.cli import parse_replicas

        try:
            replicas.update(parse_replicas(args.replicas))
        except ValueError as error:
            raise SystemExit(str(error)) from None
    with tempfile.TemporaryDirectory(prefix="infermesh-chaos-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        mesh = ChaosMesh(work, args.data_dir.resolve(), replicas, shlex.split(args.up_args))
        try:
            mesh.start()
            rows = event_loop_runner()(run_all(mesh, chosen, args.rate))
        except (ChaosError, MeshError, SeedError) as error:
            print(f"infermesh chaos: {error}", file=sys.stderr)
            return 2
        finally:
            mesh.stop()
    if args.json is not None:
        document = {
            "machine": machine(),
            "rate": args.rate,
            "short": args.short,
            "replicas": replicas,
            "up_args": args.up_args,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(document, indent=2))
    lost = [r.scenario for r in rows if r.lost]
    if lost:
        print(f"\nlost requests it must not in: {', '.join(lost)}", flush=True)
    return 1 if lost and args.short else 0


async def run_all(mesh: ChaosMesh, chosen: list[Scenario], rate: float) -> list[Row]:
    print(f"\n{len(chosen)} scenario(s) at {rate:g} requests/s through {mesh.edge}\n", flush=True)
    print(HEAD, flush=True)
    rows, details = [], []
    for seed, scenario in enumerate(chosen):
        row, found = await run_scenario(mesh, scenario, rate, seed)
        rows.append(row)
        details += [f"  {scenario.name}: {line}" for line in found]
        print(format_row(row), flush=True)
    if details:
        print("\nper input:\n" + "\n".join(details), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
