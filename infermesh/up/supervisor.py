"""Runs a whole mesh on one machine: Redis (optional), every service replica, and Envoy.

Used by `infermesh up` and by the end-to-end tests, so what the tests start is what a
user starts. Children die with the supervisor (PR_SET_PDEATHSIG) and are stopped in
order on shutdown: Envoy first (no new traffic), then the gateway, then the backends.

Telemetry: the OTEL_* variables in `extra_env` (or the supervisor's own environment) reach
every service, checked before anything starts; when the services export (an OTLP
endpoint, OTEL_SDK_DISABLED not true), Envoy gets its OpenTelemetry tracer with the same
protocol and endpoint and the sampling ratio of OTEL_TRACES_SAMPLER(_ARG). Every replica
serves Prometheus /metrics on its own port (`metrics_ports`, via <SERVICE>_METRICS_PORT),
and each scoring replica the Open Inference Protocol over HTTP on its port of
`topology.http_replicas` (SCORING_HTTP_PORT), which Envoy's edge routes /v2/... to.

Edge policy and TLS: `edge` (rate limit, API keys) goes into Envoy's edge listener; with
`tls` (a directory from `infermesh certs`) Envoy serves TLS at the edge and every replica
serves mTLS (<SERVICE>_TLS_CERT/_KEY/_CLIENT_CA), Envoy presenting the client certificate.
The gateway still dials Envoy's internal listeners in plaintext, on loopback.

Healing: once the mesh is up, `heal()` (called in a loop by `infermesh up`) starts a replica
that exited again on the same port, after the back-off of infermesh.up.healing, while
Envoy's health checks route around it; Envoy exiting, or a replica crash-looping, raises
MeshError, which stops the mesh. The run file is rewritten on every exit and restart.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh import envoy
from infermesh.certs import CertPaths, client_credentials, service_tls_env
from infermesh.settings import redis_env
from infermesh.up.healing import CrashLoop, Healer, describe_exit
from infermesh.up.lanes import BULK, BulkLane, lowered, replica_name
from infermesh.up.port_claims import PortClaims
from infermesh.up.runfile import MeshProcess, remove_processes, write_processes
from services.runtime.redis_connection import RedisTarget
from services.runtime.topology import (
    BACKENDS,
    FEATURES,
    GATEWAY,
    HEALTH_SERVICE_NAMES,
    HTTP_SERVICES,
    JOBS,
    ONE_MACHINE_ENVOY_WORKERS,
    RANKING,
    SCORING,
    SERVICES,
    Endpoint,
    MeshTopology,
)

# Envoy's transcoder reads the descriptor set and serves the OpenAPI document beside it
# (GET /v1/openapi.json): both from the installed services.genproto (infermesh/envoy/bootstrap.py).
OPENAPI_FILE = "openapi.json"
DESCRIPTOR_SET = envoy.INSTALLED_DESCRIPTOR_SET
MODULES: Mapping[str, str] = {
    GATEWAY: "gateway",
    FEATURES: "services.features",
    SCORING: "services.scoring",
    RANKING: "services.ranking",
    JOBS: "services.jobs",
}
# The jobs' Celery workers (`up --workers N`): processes of the jobs service with no port,
# supervised like replicas. They call the gateway through the edge.
JOBS_WORKER = "jobs-worker"
WORKER_MODULE = "services.jobs.worker"
# Stop order: traffic sources first, so nothing calls a service that is already gone. The
# workers go first: their warm shutdown finishes the chunk in hand through the edge.
STOP_ORDER = (JOBS_WORKER, "envoy", GATEWAY, JOBS, RANKING, SCORING, FEATURES, "redis")


class MeshError(RuntimeError):
    pass


def check_transcoder_files(descriptor_set: Path) -> None:
    """Envoy exits at start-up on a missing file it was configured with; say which, and why."""
    for path in (descriptor_set, descriptor_set.parent / OPENAPI_FILE):
        if not path.is_file():
            raise MeshError(
                f"{path} is missing: Envoy needs it (the {envoy.GENPROTO_PACKAGE} package data). "
                "Reinstall infermesh, or in a checkout run scripts/gen_protos.py."
            )


def _die_with_parent(argv: list[str]) -> list[str]:
    """Wrap argv so the kernel sends the child SIGTERM if the supervisor dies, even by SIGKILL.

    setpriv sets PR_SET_PDEATHSIG and execs the command. A preexec_fn would do the same
    in Python between fork and exec, but then gRPC's fork handlers run in the child of a
    process that has gRPC threads (the tests' OTLP receiver, say), and the child can abort.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR, as Envoy, gRPC and
    redis-server set it: connections of a mesh just stopped linger in TIME_WAIT for a
    minute, and would otherwise make `infermesh up` refuse ports nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


# Below the kernel's ephemeral range, single free ports come from the lower part and
# whole blocks (`infermesh up --port-base`) from the upper part, so neither crowds out
# the other (a test session holds dozens of single ports).
_SINGLE_PORTS = (10000, 19999)
_BLOCK_PORTS_START = 20000


class _PortPicker:
    """Free ports for children that bind later, each handed out once per process.

    Asking the kernel for port 0 returns an *ephemeral* port: in the time between our
    probe and the child's bind, any outgoing connection on the machine may take it as
    its local port (this broke CI: "scoring: cannot serve metrics ... Address already in
    use"). So ports come from below the ephemeral range, chosen at random, never twice, and
    claimed for the machine (infermesh/up/port_claims.py) so that no other process of ours
    hands them out meanwhile.
    """

    # A block stays reserved this long: past a mesh's start-up, by when its children have bound
    # what they use (and a bound port is never free). Not for ever: blocks are wide, and one
    # process (a test session) would run out of them after a handful of meshes.
    BLOCK_RESERVED_SECONDS = 300.0

    def __init__(self) -> None:
        self._given: set[int] = set()
        self._blocks: dict[range, float] = {}  # reserved block -> when the reservation ends
        self._random = random.Random(os.getpid() ^ time.monotonic_ns())
        self._claims = PortClaims()

    def __call__(self) -> int:
        first, last = _SINGLE_PORTS
        for _ in range(2000):
            port = self._random.randint(first, last)
            if port in self._given or not port_is_free(port):
                continue
            self._given.add(port)  # claimed or not: a port another process holds is not tried again
            if self._claims.claim(range(port, port + 1), self.BLOCK_RESERVED_SECONDS):
                return port
        raise MeshError(f"no free TCP port found in {first}-{last}")

    def block(self, span: int) -> int:
        """A base N with N..N+span-1 all free (for `--port-base`), not handed out again until
        released or BLOCK_RESERVED_SECONDS have passed."""
        low, _ = _ephemeral_range()
        bases = list(range(_BLOCK_PORTS_START, max(_BLOCK_PORTS_START, low - span), 500))
        self._random.shuffle(bases)
        now = time.monotonic()
        self._blocks = {block: until for block, until in self._blocks.items() if until > now}
        for base in bases:
            ports = range(base, base + span)
            if not (self._is_unreserved(ports) and all(port_is_free(p) for p in ports)):
                continue
            if self._claims.claim(ports, self.BLOCK_RESERVED_SECONDS):
                self._blocks[ports] = now + self.BLOCK_RESERVED_SECONDS
                return base
        raise MeshError(f"no block of {span} free TCP ports between {_BLOCK_PORTS_START} and {low}")

    def reserve(self, ports: Iterable[int]) -> None:
        """Ports this process was told to use (command line): never handed out, though they
        stay free until the child that binds them starts."""
        ports = list(ports)
        self._given.update(ports)
        for port in ports:  # best effort: the user chose them, taken or not
            self._claims.claim(range(port, port + 1), self.BLOCK_RESERVED_SECONDS)

    def release_block(self, base: int) -> None:
        """The mesh on the block from `base` has stopped: its ports may be handed out again."""
        for block in [block for block in self._blocks if block.start == base]:
            self._claims.release(block)
        self._blocks = {block: until for block, until in self._blocks.items() if block.start != base}

    def _is_unreserved(self, ports: range) -> bool:
        overlaps_block = any(ports.start < block.stop and block.start < ports.stop for block in self._blocks)
        return not overlaps_block and self._given.isdisjoint(ports)


free_port = _PortPicker()


def free_port_block(span: int) -> int:
    return free_port.block(span)


def release_port_block(base: int) -> None:
    free_port.release_block(base)


def topology_ports(
    topology: MeshTopology, metrics_port_offset: int | None = None, label: str = ""
) -> list[tuple[str, int]]:
    """(what, port) of every port `topology`'s processes bind (with `metrics_port_offset`,
    the replicas' metrics ports too), each what starting with `label`."""
    ports = [(f"{label}edge", topology.edge_port), (f"{label}envoy admin", topology.admin_port)]
    ports += [(f"{label}envoy {name}", port) for name, port in topology.internal_ports.items()]
    for name, endpoints in topology.replicas.items():
        ports += [(f"{label}{name}", e.port) for e in endpoints]
        if metrics_port_offset is not None:
            ports += [(f"{label}{name} metrics", e.port + metrics_port_offset) for e in endpoints]
    for name, endpoints in topology.http_replicas.items():
        ports += [(f"{label}{name} HTTP", e.port) for e in endpoints]
    return ports


def free_topology(replicas: Mapping[str, int]) -> MeshTopology:
    """A topology on free ports (edge, admin, internal listeners, every replica): for meshes
    started beside another, e.g. by the tests and by `infermesh bench --suite`."""
    endpoints = {
        name: tuple(Endpoint("127.0.0.1", free_port()) for _ in range(replicas.get(name, 1))) for name in SERVICES
    }
    return MeshTopology(
        replicas=endpoints,
        descriptor_set=DESCRIPTOR_SET,
        edge_port=free_port(),
        admin_port=free_port(),
        internal_ports={name: free_port() for name in BACKENDS},
        http_replicas={
            name: tuple(Endpoint("127.0.0.1", free_port()) for _ in endpoints[name]) for name in HTTP_SERVICES
        },
    )


@dataclass
class Child:
    role: str  # service name, "envoy" or "redis"
    name: str  # e.g. scoring-1
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Mesh:
    topology: MeshTopology
    data_dir: Path
    redis_url: str
    model_repository: Path
    log_dir: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Replica i's /metrics port: its gRPC port + this offset (predictable, for a Prometheus
    # config); None picks free ports. Either way `metrics_ports` says which, by replica name.
    metrics_port_offset: int | None = None
    # Rate limit and API keys at the edge (default: neither).
    edge: envoy.EdgePolicy = field(default_factory=envoy.EdgePolicy)
    # Certificates from `infermesh certs`: TLS at the edge, mTLS to every replica.
    tls: CertPaths | None = None
    # Envoy's worker threads (its --concurrency); None: Envoy's default, one per core.
    envoy_workers: int | None = ONE_MACHINE_ENVOY_WORKERS
    # A redis-server started for this mesh (`infermesh up`): listed in the run file too.
    redis_pid: int | None = None
    # Credentials and TLS files of that Redis (its URL: redis_url), given to the services
    # as their {PREFIX}_REDIS_* variables; None: the URL alone.
    redis_credentials: RedisTarget | None = None
    # The jobs' own replicas and Envoy, at a lower CPU priority (infermesh.up.lanes); the
    # workers call its edge. None: they call the online edge.
    bulk: BulkLane | None = None
    children: list[Child] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # Restart history and policy of every replica (heal()).
    healer: Healer = field(default_factory=Healer)
    # Replica name -> (service, endpoint, environment, command line): what respawn() starts
    # it with again (a jobs worker has no endpoint).
    _replicas: dict[str, tuple[str, Endpoint | None, dict[str, str], list[str]]] = field(
        default_factory=dict, repr=False
    )
    # heal(): replica -> when to start it again; replica -> when its outage began (until
    # it is SERVING again).
    _restart_at: dict[str, float] = field(default_factory=dict, repr=False)
    _down_since: dict[str, float] = field(default_factory=dict, repr=False)
    # Process name -> its nice value, for those not at 0 (the bulk lane's): kept on restart.
    _nice: dict[str, int] = field(default_factory=dict, repr=False)

    # ---- starting -------------------------------------------------------------------
    def check_ports(self) -> None:
        taken = [f"{what} port {port}" for what, port in self._ports() if not port_is_free(port)]
        if taken:
            raise MeshError(
                "ports already in use: "
                + ", ".join(taken)
                + ". Is another mesh running? Stop it, or choose other ports (see `infermesh up --help`)."
            )

    def _ports(self) -> list[tuple[str, int]]:
        ports = topology_ports(self.topology, self.metrics_port_offset)
        if self.bulk is not None:  # the offset is the online replicas' plan: the lane's metrics ports are free ones
            ports += topology_ports(self.bulk.topology, label=f"{BULK} lane ")
        return ports

    # ---- telemetry ------------------------------------------------------------------
    def telemetry_env(self) -> dict[str, str]:
        """The environment the services see, for the OTEL_* decisions made here."""
        return {**os.environ, **self.extra_env}

    def tracing(self) -> envoy.Tracing | None:
        """Envoy's tracer: on when the services export (an OTLP endpoint, the SDK not
        disabled), over the services' protocol. A bad OTEL_* variable is a MeshError naming
        it, before any process starts (start() asks first), not one failing replica each."""
        try:
            return envoy.tracing_from_env(self.telemetry_env())
        except ValueError as error:  # SettingsError, or an endpoint Envoy cannot use
            raise MeshError(str(error)) from None

    def metrics_port(self, replica: str, endpoint: Endpoint) -> int:
        port = self.metrics_ports.get(replica)
        if port is None:
            offset = self.metrics_port_offset
            port = self.metrics_ports[replica] = endpoint.port + offset if offset is not None else free_port()
        return port

    def _spawn(self, role: str, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 (the child owns it from here)
        nice = self._nice.get(name, 0)
        process = subprocess.Popen(
            _die_with_parent(lowered(argv, nice)),
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            # A process group of its own: Ctrl-C reaches the supervisor only, which stops the
            # children in order. Not a session of its own: the kernel's autogroup scheduling
            # would make each a group of its own, and the bulk lane's low priority would then
            # weigh against nothing (infermesh.up.lanes).
            process_group=0,
        )
        log_file.close()
        child = Child(role, name, process, log_path)
        self.children.append(child)
        return child

    def service_env(self, service: str, endpoint: Endpoint, topology: MeshTopology | None = None) -> dict[str, str]:
        """A replica's environment; `topology` is its lane's (default: the online one)."""
        topology = topology or self.topology
        prefix = service.upper()
        env = {
            f"{prefix}_HOST": endpoint.host,
            f"{prefix}_PORT": str(endpoint.port),
            "OTEL_SERVICE_NAME": service,
            **self.extra_env,
        }
        if service == GATEWAY and f"{prefix}_TRACE_ID_METADATA" not in env and self.tracing() is not None:
            # Envoy's edge already returns x-trace-id as a response header: the gateway
            # need not spend a write on sending it as initial metadata too.
            env[f"{prefix}_TRACE_ID_METADATA"] = "trailing"
        if service in (FEATURES, RANKING, JOBS):  # ranking: the seen-items sets `infermesh seed` writes
            env.update(redis_env(prefix, self.redis_credentials or RedisTarget(self.redis_url)))
        if service == SCORING:
            env["SCORING_MODEL_REPOSITORY"] = str(self.model_repository)
        elif service == JOBS:
            env["JOBS_RESULTS_DIR"] = str(self.data_dir / "jobs")
            env["JOBS_GATEWAY_TARGET"] = f"127.0.0.1:{self.topology.edge_port}"
        elif service == GATEWAY:
            for backend in (FEATURES, SCORING, RANKING):
                env[f"GATEWAY_{backend.upper()}_TARGET"] = topology.internal_endpoint(backend).address
        http = topology.http_endpoint(service, endpoint)
        if http is not None:  # scoring: the Open Inference Protocol over HTTP, beside gRPC
            env[f"{prefix}_HTTP_PORT"] = str(http.port)
        if self.tls is not None:
            env.update(service_tls_env(service, self.tls))
        return env

    def start_services(self) -> None:
        check_transcoder_files(self.topology.descriptor_set)  # before any child: Envoy comes last
        if self.tls is not None:
            self.tls.check()
        for lane, topology in self._lanes():
            for service, endpoints in topology.replicas.items():
                for index, endpoint in enumerate(endpoints):
                    self._start_replica(service, replica_name(service, index, lane), endpoint, topology, lane)

    def _lanes(self) -> list[tuple[str, MeshTopology]]:
        """("", the online topology), then (BULK, the bulk lane's) if there is one."""
        return [("", self.topology)] + ([(BULK, self.bulk.topology)] if self.bulk is not None else [])

    def _start_replica(self, service: str, name: str, endpoint: Endpoint, topology: MeshTopology, lane: str) -> None:
        env = self.service_env(service, endpoint, topology)
        variable = f"{service.upper()}_METRICS_PORT"
        if variable in env:  # the caller's choice (0 turns /metrics off)
            self.metrics_ports[name] = int(env[variable])
        elif lane:  # the offset is the online replicas' port plan; the lane's ports are free ones
            env[variable] = str(self.metrics_ports.setdefault(name, free_port()))
        else:
            env[variable] = str(self.metrics_port(name, endpoint))
        if lane:
            self._nice[name] = self.bulk.nice if self.bulk is not None else 0
            # Its spans and logs say which lane served them (the service name stays the service's).
            attributes = env.get("OTEL_RESOURCE_ATTRIBUTES", os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
            env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, [attributes, f"infermesh.lane={lane}"]))
        argv = [sys.executable, "-m", MODULES[service]]
        self._replicas[name] = (service, endpoint, env, argv)
        self._spawn(service, name, argv, env)
        self.healer.started(name)

    def replica(self, name: str) -> Child:
        """The running (or last started) process of replica `name`, e.g. scoring-1."""
        for child in reversed(self.children):
            if child.name == name:
                return child
        raise MeshError(f"no replica named {name!r}")

    def respawn(self, name: str) -> Child:
        """Start replica `name` again, same port and environment (after it died or was killed)."""
        old = self.replica(name)
        if old.process.poll() is None:
            raise MeshError(f"{name} is still running (pid {old.process.pid})")
        place = self.children.index(old)
        self.children.remove(old)
        service, _, env, argv = self._replicas[name]
        with open(old.log_path, "a") as log:  # where one run's lines end and the next's begin
            log.write(f"---- infermesh up: {name} {describe_exit(old.process.returncode)}; starting it again ----\n")
        child = self._spawn(service, name, argv, env)  # the command it was started with
        self.children.insert(place, self.children.pop())  # the run file keeps its order
        self.healer.started(name)
        self.publish_processes()
        return child

    def start_workers(self, count: int) -> None:
        """`count` jobs workers, each with the jobs service's settings and a /metrics port."""
        jobs = self.topology.replicas[JOBS][0]
        for index in range(count):
            name = f"{JOBS_WORKER}-{index}"
            env = {
                **self.service_env(JOBS, jobs),
                "OTEL_SERVICE_NAME": JOBS_WORKER,
                "JOBS_WORKER_NAME": f"{name}@%h",
                "JOBS_METRICS_PORT": str(self.metrics_ports.setdefault(name, free_port())),
            }
            if self.bulk is not None:  # the jobs' traffic through their own lane, at its priority
                env["JOBS_GATEWAY_TARGET"] = self.bulk.edge.address
                self._nice[name] = self.bulk.nice
            if self.tls is not None:  # either edge serves TLS then, with the certificate of the local CA
                env["JOBS_GATEWAY_TLS_CA_FILE"] = str(self.tls.ca_cert)
            argv = [sys.executable, "-m", WORKER_MODULE]
            self._replicas[name] = (JOBS_WORKER, None, env, argv)
            self._spawn(JOBS_WORKER, name, argv, env)
            self.healer.started(name)

    def start_envoy(self) -> None:
        """Envoy, and the bulk lane's own Envoy (envoy-bulk) when there is a lane."""
        for lane, topology in self._lanes():
            name = f"envoy-{lane}" if lane else "envoy"
            # The lane's edge takes only the workers' calls, on loopback, for jobs the online
            # edge already admitted (its API keys, JWTs and rate limit): none of them again.
            edge = envoy.EdgePolicy() if lane else self.edge
            config = envoy.write(topology, self.data_dir / f"{name}.json", self.tracing(), edge, self.tls)
            if lane and self.bulk is not None:
                self._nice[name] = self.bulk.nice
            command = envoy.envoy_command(config, log_level="warn", concurrency=self.envoy_workers)
            self._spawn("envoy", name, command, {})

    def start(self, timeout: float = 60.0, progress: bool = False) -> None:
        self.check_ports()
        self.tracing()  # the OTEL_* variables, checked once for every process
        self.start_services()
        self.start_envoy()
        self.wait_healthy(timeout, progress)

    # ---- healing --------------------------------------------------------------------
    def replica_states(self) -> list[tuple[str, str, int, bool]]:
        """(replica, service, restarts, alive) of every service replica, for /metrics."""
        return [
            (name, service, self.healer.restarts(name), self.replica(name).process.poll() is None)
            for name, (service, *_) in list(self._replicas.items())
        ]

    def heal(self) -> list[str]:
        """One round of supervision, for a mesh that is up: schedule a restart for each
        replica that exited, start those whose back-off is over, and report those SERVING
        again. Returns what happened, a line each. Raises MeshError when Envoy exits or a
        replica is crash-looping: the mesh cannot go on."""
        events: list[str] = []
        for child in list(self.children):
            returncode = child.process.poll()
            if returncode is not None and child.name not in self._restart_at:
                events.append(self._schedule_restart(child, returncode))
        now = time.monotonic()
        for name, due in list(self._restart_at.items()):
            if now >= due:
                del self._restart_at[name]
                child = self.respawn(name)
                events.append(f"{name}: started again (pid {child.process.pid}, restart {self.healer.restarts(name)})")
        for name, since in list(self._down_since.items()):
            if name in self._restart_at or self.replica(name).process.poll() is not None:
                continue
            service, endpoint, *_ = self._replicas[name]
            if endpoint is None or self._serving(endpoint, HEALTH_SERVICE_NAMES[service]):
                del self._down_since[name]
                events.append(f"{name}: SERVING again, {time.monotonic() - since:.1f} s after it exited")
        return events

    def _schedule_restart(self, child: Child, returncode: int) -> str:
        how = describe_exit(returncode)
        if child.name not in self._replicas:  # Envoy: nothing reaches any replica without it
            raise MeshError(
                f"{child.name} (pid {child.process.pid}) {how}; the mesh cannot serve without it, stopping. "
                f"Last lines of {child.log_path}:\n{self.log_tail(child)}"
            )
        decision = self.healer.exited(child.name, returncode)
        if isinstance(decision, CrashLoop):
            raise MeshError(
                f"{child.name} is crash-looping: it {how} again after {decision.restarts} restarts "
                f"within {decision.window:g} s; stopping the mesh. Last lines of {child.log_path}:\n"
                + self.log_tail(child)
            )
        now = time.monotonic()
        self._restart_at[child.name] = now + decision.delay
        self._down_since.setdefault(child.name, now)
        self.publish_processes()
        return (
            f"{child.name} (pid {child.process.pid}) {how}; starting it again in {decision.delay:g} s "
            f"(restart {decision.restarts}; log: {child.log_path})"
        )

    # ---- health ---------------------------------------------------------------------
    def channel(self, endpoint: Endpoint) -> grpc.Channel:
        """A channel to a replica or the edge: with TLS on, trusting the local CA and
        presenting the client certificate (replicas require one; the edge ignores it)."""
        if self.tls is None:
            return grpc.insecure_channel(endpoint.address)
        return grpc.secure_channel(endpoint.address, client_credentials(self.tls))

    def _serving(self, endpoint: Endpoint, service_name: str) -> bool:
        with self.channel(endpoint) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service_name), timeout=1.0
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def unhealthy(self) -> list[str]:
        """Names of the replicas (and the edge) not yet SERVING."""
        waiting = []
        for lane, topology in self._lanes():
            waiting += [
                replica_name(service, index, lane)
                for service, endpoints in topology.replicas.items()
                for index, endpoint in enumerate(endpoints)
                if not self._serving(endpoint, HEALTH_SERVICE_NAMES[service])
            ]
            # Through the edge: Envoy up, its gateway cluster healthy, the gateway's backends too.
            edge = Endpoint("127.0.0.1", topology.edge_port)
            if not self._serving(edge, HEALTH_SERVICE_NAMES[GATEWAY]):
                waiting.append(f"{lane} lane edge" if lane else "edge")
        return waiting

    def wait_healthy(self, timeout: float, progress: bool = False) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            dead = [c for c in self.children if c.process.poll() is not None]
            if dead:
                raise MeshError(
                    "; ".join(f"{c.name} exited with {c.process.returncode} (log: {c.log_path})" for c in dead)
                    + "\n"
                    + self.log_tail(dead[0])
                )
            waiting = self.unhealthy()
            if not waiting:
                self.publish_processes()
                return
            if progress and ", ".join(waiting) != last:
                last = ", ".join(waiting)
                print(f"  waiting for: {last}", flush=True)
            if time.monotonic() > deadline:
                raise MeshError(f"not healthy after {timeout:.0f}s: {', '.join(waiting)}; logs in {self.log_dir}")
            time.sleep(0.25)

    @staticmethod
    def log_tail(child: Child, lines: int = 15) -> str:
        try:
            text = child.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {child.name}| {line}" for line in text[-lines:])

    def publish_processes(self) -> None:
        """Write the run file (<data dir>/processes.json) that `infermesh profile` and
        `infermesh status` read: every process, a replica waiting to be restarted included
        (its pid then is the exited one's)."""
        processes = []
        for child in self.children:
            replica = self._replicas.get(child.name)
            processes.append(
                MeshProcess(
                    child.name,
                    child.role,
                    child.process.pid,
                    python=child.role != "envoy",
                    address=replica[1].address if replica and replica[1] else None,
                    restarts=self.healer.restarts(child.name),
                    last_exit=self.healer.last_exit(child.name),
                )
            )
        if self.redis_pid is not None:
            processes.append(MeshProcess("redis", "redis", self.redis_pid, python=False))
        write_processes(self.data_dir, f"127.0.0.1:{self.topology.edge_port}", processes, supervisor=os.getpid())

    # ---- stopping -------------------------------------------------------------------
    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM in STOP_ORDER, waiting for each group; SIGKILL what outlives the grace."""
        remove_processes(self.data_dir)
        self._restart_at.clear()
        self._down_since.clear()
        for role in STOP_ORDER:
            group = [c for c in self.children if c.role == role and c.process.poll() is None]
            for child in group:
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in group:
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        self.children.clear()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


REDIS_START_TIMEOUT_SECONDS = 60.0


def start_redis(
    data_dir: Path, port: int, log_dir: Path, persist: bool = True, password: str | None = None
) -> subprocess.Popen[bytes]:
    """A redis-server of our own; `persist` keeps the seeded catalog across restarts;
    `password` (requirepass of the default user) reaches it in a config file only the owner
    can read, never on its command line, where `ps` would show it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise MeshError(
            "redis-server is not installed. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`, "
            "macOS: `brew install redis`) or point at a running Redis with REDIS_URL=redis://host:port/0."
        )
    if not port_is_free(port):
        raise MeshError(f"port {port} for Redis is in use; choose another with --redis-port or set REDIS_URL")
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary]
    if password is not None:
        argv.append(str(_redis_config(redis_dir, password)))
    argv += [
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(redis_dir),
        "--save",
        "60 1" if persist else "",
        "--appendonly",
        "no",
        "--logfile",
        str(log_dir / "redis.log"),
    ]
    process = subprocess.Popen(
        _die_with_parent(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Ready once it answers PING: while it loads its saved data it answers -LOADING, and
    # seeding would fail. A large dataset takes a while to load.
    deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MeshError(f"redis-server exited with {process.returncode}; see {log_dir / 'redis.log'}")
        with contextlib.suppress(OSError):
            if _redis_pong(port, password):
                return process
        time.sleep(0.05)
    process.kill()
    raise MeshError(f"redis-server did not answer on port {port} within {REDIS_START_TIMEOUT_SECONDS:g}s")


def _redis_pong(port: int, password: str | None) -> bool:
    """PING (after AUTH with `password`) answered +PONG, not -LOADING or an error."""
    request = b"PING\r\n"
    if password is not None:
        secret = password.encode()
        request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + request
    expected = 1 if password is None else 2  # one line per reply: +OK / +PONG / -ERROR ...
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(request)
        replies = b""
        while replies.count(b"\r\n") < expected:
            chunk = sock.recv(256)
            if not chunk:
                return False
            replies += chunk
    return replies.split(b"\r\n")[expected - 1].startswith(b"+PONG")


def _redis_config(redis_dir: Path, password: str) -> Path:
    """redis.conf with the password, mode 0600 from its creation (rewritten at each start)."""
    path = redis_dir / "redis.conf"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"requirepass {password}\n")
    path.chmod(0o600)
    return path
