"""Helpers for tests that run their own redis-server or service process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from infermesh.up.supervisor import free_port, free_port_block, release_port_block
from services.runtime.topology import HEALTH_SERVICE_NAMES

# The port block of each mesh start_up started: released once that mesh has exited.
_PORT_BLOCKS: dict[subprocess.Popen[str], int] = {}


def _release_exited_blocks() -> None:
    for process in [process for process in _PORT_BLOCKS if process.poll() is not None]:
        release_port_block(_PORT_BLOCKS.pop(process))


def start_socket_redis(workdir: Path, *, persist: bool = True) -> subprocess.Popen[bytes]:
    """redis-server on a unix socket in `workdir` (no TCP port to linger in TIME_WAIT across
    restarts). With `persist` it saves its dump on SIGTERM and loads it when started again
    in the same directory, so a test can stop Redis and bring the same data back."""
    socket_path = workdir / "redis.sock"
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
         "--dir", str(workdir), "--save", "3600 1" if persist else "", "--appendonly", "no",
         "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=0.5) as client:
                if client.ping():
                    return process
        except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
            time.sleep(0.05)
    process.kill()
    raise AssertionError("redis-server on a unix socket did not start")


def stop(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_service(module: str, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m <module>` with exactly `env`, its output in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_reading(process: subprocess.Popen[str], timeout: float) -> str:
    """SIGTERM (SIGKILL after `timeout` seconds), then the rest of the output on its pipe."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        rest, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        rest, _ = process.communicate()
    return rest or ""


def wait_until(done: Callable[[], bool], timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> None:
    """Poll `done()` until it is true; after `timeout` seconds fail, saying `what` (or what
    it returns, computed only then)."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(interval)


def wait_until_serving(
    process: subprocess.Popen[bytes], serving: Callable[[], bool], log_path: Path, timeout: float = 60
) -> None:
    """Poll `serving()` (a health check; RpcError counts as not yet) until it says yes,
    failing with the service's log if the process exits or `timeout` passes first."""

    def ready() -> bool:
        try:
            if serving():
                return True
        except grpc.RpcError:
            pass
        assert process.poll() is None, log_path.read_text()
        return False

    wait_until(ready, timeout, f"{log_path.stem} never became SERVING", interval=0.1)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample a process serves on 127.0.0.1:<port>/metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(
        value
        for (sample, sample_labels), value in scrape(port).items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


@dataclass
class ServiceProcess:
    """A service's `python -m` process on free ports, with a channel, health and metrics."""

    process: subprocess.Popen[bytes]
    address: str
    channel: grpc.Channel
    health_name: str
    metrics_port: int
    log_path: Path

    def serving(self) -> bool:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=self.health_name), timeout=2
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_port, name, **labels)

    def log_lines(self) -> list[dict[str, Any]]:
        return json_log_lines(self.log_path)


def json_log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a process's log (anything else it printed is skipped)."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
    return lines


@contextmanager
def running_service(service: str, env: Mapping[str, str], log_path: Path) -> Iterator[ServiceProcess]:
    """`python -m services.<service>` with `env` (its <SERVICE>_* settings), on a free port
    with metrics and quick readiness, SERVING before it is yielded; stopped afterwards."""
    prefix = service.upper()
    port, metrics_port = free_port(), free_port()
    process = start_service(
        f"services.{service}",
        {
            **os.environ,
            f"{prefix}_PORT": str(port),
            f"{prefix}_METRICS_PORT": str(metrics_port),
            f"{prefix}_READINESS_INTERVAL_SECONDS": "0.1",
            "OTEL_TRACES_EXPORTER": "none",
            **env,
        },
        log_path,
    )
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    running = ServiceProcess(process, address, channel, HEALTH_SERVICE_NAMES[service], metrics_port, log_path)
    try:
        wait_until_serving(process, running.serving, log_path)
        yield running
    finally:
        channel.close()
        stop(process)


def start_up(
    data_dir: Path, redis_url: str, edge: int, *options: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[str]:
    """`infermesh up` as a user starts it, on free ports (replicas from a free block, metrics
    1000 above), with the tests' Redis; its output on a pipe (wait_until_up reads it)."""
    _release_exited_blocks()
    base = free_port_block(1600)  # replicas from N+100, metrics 1000 above
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infermesh.cli",
            "up",
            "--data-dir",
            str(data_dir),
            "--redis-url",
            redis_url,
            "--edge-port",
            str(edge),
            "--admin-port",
            str(free_port()),
            "--port-base",
            str(base),
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    _PORT_BLOCKS[process] = base
    return process


def read_until(process: subprocess.Popen[str], marker: str, output: list[str], timeout: float) -> bool:
    """Read a process's output lines into `output` until one starts with `marker` (True), or
    the output ends or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            return False
        output.append(line)
        if line.startswith(marker):
            return True
    return False


def wait_until_up(process: subprocess.Popen[str], output: list[str], timeout: float) -> None:
    """Read `infermesh up`'s output into `output` until it says it is up."""
    if not read_until(process, "Ctrl-C stops everything", output, timeout):
        raise AssertionError("infermesh up did not come up:\n" + "".join(output))


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
