"""An Envoy of a test's own in front of in-process grpc.aio backends, for the integration
tests of the rendered config (test_envoy_mesh.py, test_envoy_policy.py).

Every Envoy port is 0 in the rendered topology (the kernel picks free ones) and read back
from the admin API, so there is no port race.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from infermesh.certs import CertPaths
from infermesh.envoy import bootstrap, process
from infermesh.envoy.edge_policy import EdgePolicy
from services.runtime.topology import BACKENDS, HEALTH_SERVICE_NAMES, Endpoint, MeshTopology

REPO_ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = REPO_ROOT / bootstrap.DEFAULT_DESCRIPTOR_SET
WAIT_S = 15.0  # upper bound for every "until" loop
RPC_TIMEOUT_S = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Backend:
    service: str
    port: int
    server: grpc.aio.Server
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped module)

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        await self.health.set(HEALTH_SERVICE_NAMES[self.service], status)


async def start_backend(
    service: str,
    add: Callable[[grpc.aio.Server], None] | None,
    credentials: grpc.ServerCredentials | None = None,
) -> Backend:
    """A grpc.aio server on a free port with a real health servicer (SERVING), plaintext
    or with `credentials`; `add` registers its service, if any (None: health only)."""
    server = grpc.aio.server()
    if add is not None:
        add(server)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    backend = Backend(service, port, server, servicer)
    await backend.set_serving(True)
    return backend


@dataclass
class Envoy:
    proc: subprocess.Popen[bytes]
    workdir: Path
    admin: str = ""
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def logs(self) -> str:
        """Envoy's own log tail, for failure messages."""
        texts = [p.read_text(errors="replace")[-4000:] for p in self.workdir.glob("*.log")]
        return "\n".join(texts)

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.ports[listener]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_envoy(config: Path, workdir: Path) -> Envoy:
    cmd = process.envoy_command(
        config,
        log_path=workdir / "envoy.log",
        admin_address_path=workdir / "admin.address",
        concurrency=2,
    )
    with (workdir / "access.log").open("wb") as out, (workdir / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=workdir)
    return Envoy(proc, workdir)


async def until(what: str, envoy: Envoy, probe: Callable[[], Awaitable[bool]]) -> None:
    """Poll `probe` until it is true; fail with Envoy's log after WAIT_S or if Envoy died."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if envoy.proc.poll() is not None:
            code = envoy.proc.returncode
            pytest.fail(f"envoy exited ({code}) waiting for {what}:\n{envoy.logs()}")
        with contextlib.suppress(OSError):  # admin not answering yet: try again
            if await probe():
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out after {WAIT_S}s waiting for {what}:\n{envoy.logs()}")


# The backends run on this event loop: blocking HTTP calls go to a thread so the loop
# keeps answering Envoy's health checks meanwhile.
def _http_sync(
    address: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def http_call(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_http_sync, address, method, path, body, headers or {})


async def admin_get(envoy: Envoy, path: str) -> str:
    status, _, body = await http_call(envoy.admin, "GET", path)
    assert status == 200, body
    return body.decode()


async def health_flags(envoy: Envoy) -> dict[tuple[str, int], str]:
    """(cluster, port) -> health_flags from admin /clusters ("healthy" when routable)."""
    flags = {}
    for line in (await admin_get(envoy, "/clusters")).splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[2] == "health_flags":
            flags[(parts[0], int(parts[1].rsplit(":", 1)[1]))] = parts[3]
    return flags


async def read_back_ports(envoy: Envoy) -> bool:
    address_file = envoy.workdir / "admin.address"
    if not envoy.admin:
        text = address_file.read_text().strip() if address_file.exists() else ""
        if not text:
            return False
        envoy.admin = text
    listeners = json.loads(await admin_get(envoy, "/listeners?format=json"))
    for status in listeners.get("listener_statuses", []):
        port = status["local_address"]["socket_address"].get("port_value", 0)
        if port:
            envoy.ports[status["name"]] = port
    return set(envoy.ports) == {"edge", *BACKENDS}


def topology_of(replicas: Iterable[tuple[str, int]]) -> MeshTopology:
    """(service, port) of each running backend -> a topology with every Envoy port 0."""
    grouped: dict[str, list[Endpoint]] = {}
    for service, port in replicas:
        grouped.setdefault(service, []).append(Endpoint("127.0.0.1", port))
    return MeshTopology(
        replicas={name: tuple(endpoints) for name, endpoints in grouped.items()},
        descriptor_set=DESCRIPTOR,
        edge_port=0,
        admin_port=0,
        internal_ports={name: 0 for name in BACKENDS},
    )


async def all_healthy(envoy: Envoy, replicas: Iterable[tuple[str, int]]) -> bool:
    flags = await health_flags(envoy)
    return all(flags.get((service, port)) == "healthy" for service, port in replicas)


@contextlib.asynccontextmanager
async def running_envoy(
    workdir: Path,
    replicas: list[tuple[str, int]],
    edge: EdgePolicy | None = None,
    tls: CertPaths | None = None,
) -> AsyncIterator[Envoy]:
    """Envoy in front of `replicas` ((service, port) each), up with every one healthy."""
    config = bootstrap.write(topology_of(replicas), workdir / "envoy.json", edge=edge, tls=tls)
    envoy = start_envoy(config, workdir)
    try:
        await until("admin and listeners", envoy, lambda: read_back_ports(envoy))
        await until("every replica healthy", envoy, lambda: all_healthy(envoy, replicas))
        yield envoy
    finally:
        envoy.stop()
