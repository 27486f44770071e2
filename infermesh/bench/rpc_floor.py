"""What one gRPC hop costs before any work is done: `python -m infermesh.bench.rpc_floor`.

A bare grpc.aio server (one generic unary method that returns its request bytes, on the
mesh's event loop) runs in a subprocess; this process calls it with `--concurrency` calls
in flight, directly and through a real Envoy (HTTP/2 on both sides, the router filter
only: less than the mesh's listeners do). For each it reports calls/s, p50/p99, and the
CPU per call of the client (this process), the server and Envoy, read from /proc.

Then the floor of one reference Recommend: it makes 4 such calls through Envoy (client ->
edge -> gateway; gateway -> features, scoring, ranking), so no Python mesh of this shape
can answer faster than 4 x p50 at concurrency 1, or spend less CPU per request than
4 x (client + server + Envoy), before Redis, ONNX Runtime or ranking do anything.
A benchmark, not a test: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from infermesh.bench import report
from infermesh.envoy import envoy_command, plain_proxy
from infermesh.up.supervisor import free_port
from services.runtime.event_loop import event_loop_runner
from services.runtime.topology import ONE_MACHINE_ENVOY_WORKERS

METHOD = "/infermesh.bench.Echo/Echo"
# One Recommend = the load generator's call to the edge + the gateway's 3 backend calls.
CALLS_PER_RECOMMEND = 4


def _same(message: bytes) -> bytes:
    return message


async def serve(port: int) -> None:
    """The echo server (run in the subprocess): no interceptors, no health, nothing else."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=_same, response_serializer=_same)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("infermesh.bench.Echo", {"Echo": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _cpu_seconds(pid: int) -> float | None:
    """report.cpu_seconds, or None where /proc cannot be read (the CPU columns say n/a)."""
    try:
        return report.cpu_seconds(pid)
    except OSError:
        return None


@dataclass(frozen=True)
class Result:
    path: str  # "direct" or "envoy"
    concurrency: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    client_us_per_call: float
    server_us_per_call: float | None
    envoy_us_per_call: float | None


async def _calls(
    target: str, payload: bytes, concurrency: int, seconds: float, latencies: list[float] | None, idle: float = 0.0
) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=_same, response_deserializer=_same)
        stop_at = time.perf_counter() + seconds

        async def caller() -> int:
            done = 0
            while time.perf_counter() < stop_at:
                if idle:  # each call after a quiet spell, as at a low request rate
                    await asyncio.sleep(idle)
                began = time.perf_counter()
                await call(payload, timeout=10)
                if latencies is not None:
                    latencies.append(time.perf_counter() - began)
                done += 1
            return done

        return sum(await asyncio.gather(*(caller() for _ in range(concurrency))))


async def _ready(target: str, log: Path, timeout: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=_same, response_deserializer=_same)
        give_up = time.monotonic() + timeout
        while True:
            try:
                await call(b"", timeout=1, wait_for_ready=True)
                return
            except grpc.aio.AioRpcError as error:
                if time.monotonic() > give_up:
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise SystemExit(
                        f"{target} did not answer within {timeout:g} s ({error.code().name}); {log.name}:\n{tail}"
                    ) from None


def measure(
    path: str,
    target: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    server_pid: int,
    envoy_pid: int | None,
    log: Path,
    idle: float = 0.0,
) -> Result:
    run = event_loop_runner()
    run(_ready(target, log))
    run(_calls(target, payload, concurrency, min(1.0, seconds / 3), None))  # warm: connections, allocator
    latencies: list[float] = []
    before = (time.process_time(), _cpu_seconds(server_pid), _cpu_seconds(envoy_pid) if envoy_pid else None)
    started = time.perf_counter()
    calls = run(_calls(target, payload, concurrency, seconds, latencies, idle))
    elapsed = time.perf_counter() - started
    after = (time.process_time(), _cpu_seconds(server_pid), _cpu_seconds(envoy_pid) if envoy_pid else None)

    def per_call(index: int) -> float | None:
        if before[index] is None or after[index] is None:
            return None
        return (after[index] - before[index]) / calls * 1e6  # type: ignore[operator]

    p50, p99 = np.percentile(np.array(latencies) * 1000.0, [50, 99]) if latencies else (0.0, 0.0)
    if idle:
        path = f"{path}, {idle * 1000:g} ms idle before each call"
    return Result(
        path, concurrency, calls / elapsed, float(p50), float(p99), per_call(0) or 0.0, per_call(1), per_call(2)
    )


def floor(results: Sequence[Result]) -> dict[str, float]:
    """The reference Recommend's floor from the Envoy rows: latency at c=1, CPU at the highest concurrency."""
    through = [r for r in results if r.path == "envoy"]
    if not through:
        return {}
    single = min(through, key=lambda r: r.concurrency)
    loaded = max(through, key=lambda r: r.concurrency)
    cpu_us = loaded.client_us_per_call + (loaded.server_us_per_call or 0.0) + (loaded.envoy_us_per_call or 0.0)
    cpu_ms = CALLS_PER_RECOMMEND * cpu_us / 1000.0
    cores = os.cpu_count() or 1
    return {
        "calls_per_recommend": CALLS_PER_RECOMMEND,
        "p50_ms_at_c1": CALLS_PER_RECOMMEND * single.p50_ms,
        "cpu_ms_per_request": cpu_ms,
        "max_requests_per_s_on_this_machine": cores * 1000.0 / cpu_ms if cpu_ms else 0.0,
        "cores": cores,
    }


def format_table(results: Sequence[Result]) -> str:
    def us(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    rows = [
        [
            r.path,
            f"c={r.concurrency}",
            f"{r.calls_per_s:,.0f}",
            f"{r.p50_ms:.3f}",
            f"{r.p99_ms:.3f}",
            us(r.client_us_per_call),
            us(r.server_us_per_call),
            us(r.envoy_us_per_call),
        ]
        for r in results
    ]
    header = [
        "path",
        "load",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "client CPU us/call",
        "server CPU us/call",
        "Envoy CPU us/call",
    ]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infermesh.bench.rpc_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--payload-bytes", type=int, default=1024, help="request (and response) size (default %(default)s)")
    p.add_argument("--concurrency", default="1,16", help="calls in flight, comma-separated (default %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per row (default %(default)s)")
    p.add_argument("--no-envoy", action="store_true", help="direct calls only")
    p.add_argument(
        "--idle-ms",
        type=float,
        default=0.0,
        help="also measure each path at c=1 with this many ms of quiet before each call: what a "
        "call costs at a low request rate, when every process it crosses was asleep (default: off)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the server subprocess
    return p


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=sink, stdin=subprocess.DEVNULL)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.serve is not None:
        event_loop_runner()(serve(args.serve))
        return 0
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--concurrency takes integers, e.g. 1,16 (got {args.concurrency!r})") from None
    if not levels or min(levels) < 1 or args.seconds <= 0 or args.payload_bytes < 0 or args.idle_ms < 0:
        raise SystemExit("--concurrency needs values >= 1, --seconds > 0, --payload-bytes and --idle-ms >= 0")
    idle = args.idle_ms / 1000.0
    payload = os.urandom(args.payload_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="rpc-floor-"))
    server_port = free_port()
    children: list[subprocess.Popen[bytes]] = []
    results: list[Result] = []
    try:
        server = _start(
            [sys.executable, "-m", "infermesh.bench.rpc_floor", "--serve", str(server_port)], workdir / "server.log"
        )
        children.append(server)

        def measure_path(path: str, port: int, envoy_pid: int | None, log: Path) -> None:
            # (concurrency, quiet before each call): the levels back to back, then c=1 after quiet
            loads = [(level, 0.0) for level in levels] + ([(1, idle)] if idle else [])
            for level, quiet in loads:
                target = f"127.0.0.1:{port}"
                results.append(measure(path, target, payload, level, args.seconds, server.pid, envoy_pid, log, quiet))

        measure_path("direct", server_port, None, workdir / "server.log")
        if not args.no_envoy:
            envoy_port = free_port()
            config = workdir / "envoy.json"
            config.write_text(json.dumps(plain_proxy(envoy_port, server_port)))
            # As `infermesh up` runs Envoy (its --envoy-workers default).
            command = envoy_command(config, log_level="warn", concurrency=ONE_MACHINE_ENVOY_WORKERS)
            envoy = _start(command, workdir / "envoy.log")
            children.append(envoy)
            measure_path("envoy", envoy_port, envoy.pid, workdir / "envoy.log")
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = floor(results)
    if args.json:
        print(
            json.dumps(
                {
                    "machine": report.machine(),
                    "payload_bytes": args.payload_bytes,
                    "rows": [asdict(r) for r in results],
                    "recommend_floor": summary,
                },
                indent=2,
            )
        )
        return 0
    machine = report.machine()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']}, Python {machine['python']}; "
        f"payload {args.payload_bytes} bytes each way"
    )
    print(format_table(results))
    if summary:
        print(
            f"\nfloor of one Recommend ({CALLS_PER_RECOMMEND} calls through Envoy, no work): "
            f"p50 >= {summary['p50_ms_at_c1']:.2f} ms at c=1; "
            f"CPU >= {summary['cpu_ms_per_request']:.2f} ms per request, "
            f"so at most {summary['max_requests_per_s_on_this_machine']:,.0f} requests/s on {summary['cores']} cores"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
