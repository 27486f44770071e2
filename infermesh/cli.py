"""`infermesh`: run the mesh on one machine, seed the reference data, render Envoy configs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from infermesh import __version__
from infermesh.cli_help import CommandParser, add_delegated, port, run_delegated, whole_number
from infermesh.settings import (
    add_data_dir_argument,
    local_redis_password,
    redis_password_file,
    tool_settings,
    tools_redis_target,
)
from infermesh.up.lanes import DEFAULT_BULK_NICE
from services.runtime.pipeline import PipelineFile, PipelineSettings
from services.runtime.redis_connection import RedisTarget
from services.runtime.redis_keys import LOCAL_REDIS_PORT
from services.runtime.settings import SettingsError, load_settings
from services.runtime.topology import ONE_MACHINE_ENVOY_WORKERS

if TYPE_CHECKING:
    from services.runtime.topology import MeshTopology

DEFAULT_REDIS_PORT = LOCAL_REDIS_PORT


def _replicas(text: str) -> dict[str, int]:
    from infermesh.envoy.cli import parse_replicas

    try:
        return parse_replicas(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _up_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = commands.add_parser(
        "up",
        help="start Redis, seed the demo data if absent, start every service and Envoy",
        description="Run the whole mesh on this machine until Ctrl-C / SIGTERM.",
    )
    up.add_argument(
        "--replicas", type=_replicas, default={}, help="e.g. scoring=2,features=2 (default scoring=2, others 1)"
    )
    up.add_argument("--edge-port", type=port, default=8080, help="REST + gRPC edge port (default %(default)s)")
    up.add_argument(
        "--admin-port", type=port, default=9901, help="Envoy admin port, on 127.0.0.1 (default %(default)s)"
    )
    add_data_dir_argument(up, "models, Redis dump, rendered Envoy config and logs")
    up.add_argument(
        "--redis-url",
        default=tool_settings().redis_url or None,
        help="use this Redis instead of starting one "
        "(default $INFERMESH_REDIS_URL or $REDIS_URL; unset: start redis-server)",
    )
    up.add_argument(
        "--redis-port", type=int, default=DEFAULT_REDIS_PORT, help="port of the Redis `up` starts (default %(default)s)"
    )
    up.add_argument(
        "--port-base",
        type=int,
        default=None,
        help="move the internal ports: Envoy listeners at N+1..N+3, replicas of each service from N+100, N+200, ... "
        "(default: listeners 9101-9103, replicas from 30100)",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every service to be healthy")
    tracing = up.add_mutually_exclusive_group()
    tracing.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export every service's and Envoy's spans to this collector, e.g. http://127.0.0.1:4317: sets "
        "OTEL_EXPORTER_OTLP_ENDPOINT for them (over $OTEL_EXPORTER_OTLP_PROTOCOL, grpc or http/protobuf; "
        "default: the OTEL_EXPORTER_OTLP_* variables as they are; none set: no export)",
    )
    tracing.add_argument(
        "--trace-view",
        action="store_true",
        help="no collector at hand: receive the spans in this process and show them in a local web UI",
    )
    up.add_argument(
        "--trace-view-port", type=int, default=16686, help="port of the --trace-view web UI (default %(default)s)"
    )
    up.add_argument(
        "--trace-sampling",
        type=float,
        default=None,
        metavar="RATIO",
        help="sample this share of requests, 0..1 (sets OTEL_TRACES_SAMPLER=parentbased_traceidratio; "
        "default: $OTEL_TRACES_SAMPLER, else every request)",
    )
    up.add_argument(
        "--metrics-port-offset",
        type=int,
        default=1000,
        help="each replica serves Prometheus /metrics on its gRPC port + this (default %(default)s)",
    )
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="a replica that exits is started again (back-off 0.5 s doubling to 10 s); one that exits again "
        "after this many restarts within --restart-window seconds stops the mesh (default %(default)s)",
    )
    up.add_argument(
        "--restart-window", type=float, default=60.0, help="seconds, see --max-restarts (default %(default)s)"
    )
    up.add_argument(
        "--envoy-workers",
        type=whole_number(1),
        default=ONE_MACHINE_ENVOY_WORKERS,
        help="Envoy's worker threads (its --concurrency). On one machine Envoy shares the cores with "
        "every service, and one worker is far from its limit at what they serve (default %(default)s)",
    )
    up.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Celery workers running jobs (`infermesh jobs`, POST /v1/jobs), supervised like replicas; "
        "0: jobs are accepted and wait in the queue (default %(default)s)",
    )
    up.add_argument(
        "--bulk-nice",
        type=int,
        default=DEFAULT_BULK_NICE,
        help="with --workers: the jobs run through a lane of their own (as many replicas of each pipeline "
        "service as the online mesh has, and an Envoy) at this nice value, 0..19, so online requests keep "
        "the CPU they need (default %(default)s)",
    )
    up.add_argument(
        "--no-bulk-lane",
        action="store_true",
        help="run the jobs' calls through the online replicas instead of a lane of their own",
    )
    up.add_argument(
        "--supervisor-metrics-port",
        type=int,
        default=9902,
        help="port of up's own /metrics (replica restarts, replicas up), on 127.0.0.1; 0: off (default %(default)s)",
    )
    from infermesh.envoy.cli import add_edge_arguments

    # --edge-rate-limit, --edge-rate-burst, --api-key-file, --jwt-*, --edge-auth,
    # --edge-caller-rate-limit, --tls (all off by default).
    up.add_argument(
        "--pipeline",
        type=Path,
        default=None,
        help=(
            "the pipeline file to serve: views, models and their inputs, ranking stages, fallback "
            "(docs/pipelines.md; checked before anything starts). Default: $INFERMESH_PIPELINE or the demo pipeline"
        ),
    )
    add_edge_arguments(up)


def _print_ready(
    topology: MeshTopology,
    log_dir: Path,
    redis_url: str,
    extras: Sequence[tuple[str, str]] = (),
    curl_options: str = "",
    scheme: str = "http",
) -> None:
    edge = topology.edge_port
    replicas = topology.replicas
    counts = ", ".join(f"{name} x{len(eps)}" for name, eps in replicas.items())
    more = "".join(f"\n  {label:<18} {value}" for label, value in extras)
    host = "localhost" if scheme == "https" else "127.0.0.1"  # the edge certificate's name
    # The README's command: inside $(...) bash reads the quotes afresh, so '"i%g"' is unescaped.
    body = '{\\"user_id\\":\\"u42\\",\\"k\\":20,\\"candidate_ids\\":[$(seq -s, -f \'"i%g"\' 0 199)]}'
    print(
        f"""
infermesh is up ({counts}).
  REST + gRPC edge   {scheme}://{host}:{edge}   (POST /v1/recommend, infermesh.gateway.v1.GatewayService,
                                              Open Inference Protocol clients: inference.GRPCInferenceService
                                              over gRPC, /v2/... over HTTP, e.g. GET /v2/models/ranker)
  Envoy admin        http://127.0.0.1:{topology.admin_port}   (Envoy's metrics: /stats/prometheus)
  Redis              {redis_url}
  logs               {log_dir}/{more}

Try it:
  curl -s{curl_options} {scheme}://localhost:{edge}/v1/recommend -d "{body}"

A replica that exits is started again; `infermesh status` lists every process and its restarts.
Ctrl-C stops everything.""",
        flush=True,
    )


def _local_redis(data_dir: Path, port: int, url: str) -> RedisTarget:
    """The Redis `up` starts: its generated password (kept in the data dir, mode 0600),
    which reaches the services through their environment, never a command line."""
    password = SecretStr(local_redis_password(data_dir, port))
    return RedisTarget(url, password=password, password_variable=str(redis_password_file(data_dir, port)))


def _moved_ports(base: int | None) -> dict[str, dict[str, int]]:
    from services.runtime.topology import BACKENDS, SERVICES

    if base is None:
        return {}
    return {
        "internal_ports": {name: base + 1 + i for i, name in enumerate(BACKENDS)},
        "replica_base_ports": {name: base + 100 * (1 + i) for i, name in enumerate(SERVICES)},
    }


def _telemetry_env(args: argparse.Namespace, otlp_endpoint: str | None) -> dict[str, str]:
    """OTEL_* for every service (Envoy's tracer follows them, see infermesh.up.supervisor)."""
    env: dict[str, str] = {}
    if otlp_endpoint:
        # The base URL (OTLP/HTTP appends /v1/traces); the shell's traces-specific one, used
        # as it is, must not win over the flag: empty is unset.
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = ""
    if args.trace_sampling is not None:
        if not 0.0 <= args.trace_sampling <= 1.0:
            raise ValueError(f"--trace-sampling must be within 0..1, got {args.trace_sampling}")
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = repr(args.trace_sampling)
    if args.trace_view:
        # The local view's receiver speaks OTLP/gRPC.
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = ""
        # Spans reach the local view within half a second instead of the SDK's 5 s.
        env.setdefault("OTEL_BSP_SCHEDULE_DELAY", os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "500"))
    return env


def _checked_pipeline(path: Path | None, repository: Path | None, require_all: bool = False) -> PipelineFile:
    """The pipeline `up` serves, checked as each service will check it: views, stages, and
    the models the repository holds (all of them once `require_all`). MeshError if wrong."""
    from infermesh.pipeline import check_pipeline
    from infermesh.up.supervisor import MeshError

    try:
        source = path or load_settings(PipelineSettings).pipeline or None
        held = repository if repository is not None and repository.is_dir() else None
        return check_pipeline(source, held, require_all)
    except SettingsError as error:  # PipelineError, or INFERMESH_PIPELINE unreadable
        raise MeshError(str(error)) from None


def cmd_up(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from infermesh.certs import CertPaths
    from infermesh.envoy.cli import edge_policy_from_args
    from infermesh.features.ingest import IngestError
    from infermesh.pipeline import data_repository, ingest_data
    from infermesh.up.healing import Healer, RestartPolicy, describe_exit
    from infermesh.up.lanes import PIPELINE, bulk_lane
    from infermesh.up.metrics import serve_supervisor_metrics
    from infermesh.up.supervisor import DESCRIPTOR_SET, Mesh, MeshError, free_port, start_redis, topology_ports
    from infermesh.workload.seed import SeedError, format_summary, model_repository, seed_all
    from services.runtime.redis_keys import DEFAULT_NAMESPACE
    from services.runtime.topology import local_topology

    data_dir = args.data_dir.resolve()
    log_dir = data_dir / "logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    redis_process = None
    mesh = None
    local_tracing = None
    try:
        pipeline = _checked_pipeline(args.pipeline, None)  # the file, its views and stages
        # Its own models (the `data` section), or the demo's that `up` seeds.
        repository = data_repository(pipeline) or model_repository(data_dir)
        _checked_pipeline(pipeline.path, repository)  # the models the repository holds already
        otlp_endpoint = args.otlp_endpoint
        extras: list[tuple[str, str]] = []
        if args.trace_view:
            from infermesh.traces.cli import LocalTracing

            try:
                local_tracing = LocalTracing.start(
                    otlp_port=free_port(), http_port=args.trace_view_port, receiver_now=False
                )
            except OSError as error:
                raise MeshError(f"trace view: {error}; choose another --trace-view-port") from None
            otlp_endpoint = local_tracing.otlp_endpoint
            extras.append(("trace view", f"{local_tracing.view.url}   (OTLP in at {otlp_endpoint})"))
        try:
            telemetry_env = _telemetry_env(args, otlp_endpoint)
        except ValueError as error:
            raise MeshError(str(error)) from None
        telemetry_env[PipelineSettings.variable("pipeline")] = str(pipeline.path.resolve())  # every service's
        if not args.trace_view:
            from infermesh.envoy import tracing_from_env

            try:  # where the spans go, as every process will read it (a bad variable: said here)
                exported = tracing_from_env({**os.environ, **telemetry_env})
            except ValueError as error:
                raise MeshError(str(error)) from None
            if exported is not None:
                where = f"{exported.otlp_endpoint}   ({exported.protocol}; every service and Envoy)"
                extras.append(("traces (OTLP)", where))
        try:
            edge_policy = edge_policy_from_args(args)
            tls = CertPaths.checked(args.tls) if args.tls is not None else None
            restart_policy = RestartPolicy(max_restarts=args.max_restarts, window=args.restart_window)
        except ValueError as error:
            raise MeshError(str(error)) from None
        if args.workers < 0:  # before anything starts
            raise MeshError(f"--workers must be 0 or more, got {args.workers}")
        curl_options = ""
        if edge_policy.rate_limit_rps is not None:
            burst = edge_policy.rate_limit_burst or edge_policy.rate_limit_rps
            extras.append(
                (
                    "edge rate limit",
                    f"{edge_policy.rate_limit_rps} requests/s (burst {burst}), then 429 / RESOURCE_EXHAUSTED",
                )
            )
        if edge_policy.api_keys:
            clients = ", ".join(k.client for k in edge_policy.api_keys)
            extras.append(
                ("API keys", f"required at the edge (x-api-key or authorization: Bearer); clients: {clients}")
            )
            curl_options += " -H 'x-api-key: <KEY>'"
        if edge_policy.jwt is not None:
            jwt = edge_policy.jwt
            keys = jwt.jwks_file or jwt.jwks_uri
            extras.append(("JWT", f"issuer {jwt.issuer}, audiences {', '.join(jwt.audiences)}; keys: {keys}"))
            if edge_policy.accepts == "jwt":
                curl_options += " -H 'authorization: Bearer <TOKEN>'"
        if edge_policy.caller_rate_limit_rps is not None:
            burst = edge_policy.caller_rate_limit_burst or edge_policy.caller_rate_limit_rps
            extras.append(
                (
                    "caller rate limit",
                    f"{edge_policy.caller_rate_limit_rps} requests/s per caller (burst {burst}), "
                    "then 429 / RESOURCE_EXHAUSTED for that caller",
                )
            )
        if tls is not None:
            extras.append(("TLS", f"edge over TLS, mTLS to every replica (CA: {tls.ca_cert})"))
            curl_options += f" --cacert {tls.ca_cert}"
        topology = local_topology(
            args.replicas,
            descriptor_set=DESCRIPTOR_SET,
            edge_port=args.edge_port,
            admin_port=args.admin_port,
            **_moved_ports(args.port_base),
        )
        # Ports named above are bound only as their processes start: keep them from the free
        # ports picked meanwhile (the lane's, the metrics ports), or a replica may lose its bind.
        free_port.reserve([port for _, port in topology_ports(topology, args.metrics_port_offset)] + [args.redis_port])
        lane = None
        if args.workers and not args.no_bulk_lane:  # the jobs' own replicas, as many as online
            try:
                counts = {service: len(topology.replicas[service]) for service in PIPELINE}
                lane = bulk_lane(DESCRIPTOR_SET, free_port, args.bulk_nice, counts)
            except ValueError as error:
                raise MeshError(f"--bulk-nice: {error}") from None
        redis_url = args.redis_url
        if redis_url is None:
            print(f"starting redis-server on 127.0.0.1:{args.redis_port} (data in {data_dir / 'redis'})", flush=True)
            redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
            redis = _local_redis(data_dir, args.redis_port, redis_url)
            redis_process = start_redis(data_dir, args.redis_port, log_dir, password=redis.password.get_secret_value())
        else:
            try:
                redis = tools_redis_target(redis_url, data_dir)
            except ValueError as error:  # SettingsError: INFERMESH_REDIS_* do not go together
                raise MeshError(str(error)) from None
        if pipeline.spec.data is None:
            print("checking the demo data (catalog in Redis, ranker model)...", flush=True)
            summary = format_summary(seed_all(data_dir, redis, progress=sys.stderr.isatty()))
        else:
            print(f"loading the pipeline's data ({pipeline.path}: data.ingest)...", flush=True)
            try:
                summary = "\n".join(ingest_data(pipeline, redis, DEFAULT_NAMESPACE, progress=sys.stderr.isatty()))
            except (IngestError, RedisError) as error:
                raise MeshError(f"loading the pipeline's data: {error}") from None
        print(textwrap.indent(summary, "  "), flush=True)
        _checked_pipeline(pipeline.path, repository, require_all=True)  # the models, now all there
        mesh = Mesh(
            topology=topology,
            data_dir=data_dir,
            redis_url=redis_url,
            model_repository=repository,
            log_dir=log_dir,
            extra_env=telemetry_env,
            metrics_port_offset=args.metrics_port_offset,
            edge=edge_policy,
            tls=tls,
            redis_pid=redis_process.pid if redis_process is not None else None,
            redis_credentials=redis,
            healer=Healer(restart_policy),
            bulk=lane,
            envoy_workers=args.envoy_workers,
        )
        mesh.check_ports()
        print("starting services and Envoy...", flush=True)
        mesh.start_services()
        mesh.start_envoy()
        mesh.start_workers(args.workers)
        extras.append(
            (
                "jobs",
                f"POST /v1/jobs, `infermesh jobs submit FILE`; {args.workers} Celery worker(s), "
                f"results in {data_dir / 'jobs'}",
            )
        )
        if lane is not None:
            extras.append(
                ("jobs' lane", f"{lane.edge.address}: the workers' own replicas and Envoy, at nice {lane.nice}")
            )
        if local_tracing is not None:
            try:
                local_tracing.start_receiver()  # after the forks (see LocalTracing.start)
            except OSError as error:
                raise MeshError(f"trace view: {error}") from None
        mesh.wait_healthy(args.timeout, progress=True)
        if mesh.metrics_ports:
            ports = sorted(mesh.metrics_ports.items(), key=lambda item: item[1])
            extras.append(("metrics", "  ".join(f"{name}=:{port}" for name, port in ports) + "   (GET /metrics)"))
        if args.supervisor_metrics_port:
            try:
                serve_supervisor_metrics(mesh, args.supervisor_metrics_port)
                extras.append(
                    (
                        "supervisor metrics",
                        f"http://127.0.0.1:{args.supervisor_metrics_port}/metrics   (replica restarts)",
                    )
                )
            except OSError as error:  # auxiliary: the mesh serves without it
                print(
                    f"warning: up's own /metrics not served on port {args.supervisor_metrics_port} ({error.strerror}); "
                    "choose another with --supervisor-metrics-port",
                    flush=True,
                )
        _print_ready(topology, log_dir, redis_url, extras, curl_options, "https" if tls is not None else "http")
        while not stop_requested:
            if redis_process is not None and redis_process.poll() is not None:
                raise MeshError(
                    f"redis-server (pid {redis_process.pid}) {describe_exit(redis_process.returncode)}; "
                    f"features and ranking need it, stopping the mesh. See {log_dir / 'redis.log'}"
                )
            # Restarts replicas that exit; raises MeshError if Envoy exits or one crash-loops.
            for event in mesh.heal():
                print(f"[{time.strftime('%H:%M:%S')}] {event}", flush=True)
            time.sleep(0.2)
        print("\nstopping (SIGTERM to Envoy, then gateway, then backends)...", flush=True)
        return 0
    except (MeshError, SeedError) as error:
        print(f"infermesh up: {error}", file=sys.stderr)
        return 1
    finally:
        # Ignore further Ctrl-C while stopping, so the ordered shutdown completes.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if mesh is not None:
            mesh.stop()
        if local_tracing is not None:
            local_tracing.stop()
        if redis_process is not None and redis_process.poll() is None:
            redis_process.terminate()  # redis-server saves its dump on SIGTERM
            redis_process.wait(timeout=30)
        print("stopped.", flush=True)


# Subcommands owned by other packages: name -> (module, help). Each module has main(argv) -> int.
DELEGATED: dict[str, tuple[str, str]] = {
    "seed": ("infermesh.workload.seed", "generate the reference catalog and model, load Redis"),
    "envoy": ("infermesh.envoy.cli", "render or check Envoy configs"),
    "certs": ("infermesh.certs", "create a local CA and certificates for `up --tls` (edge TLS, mTLS)"),
    "bench": ("infermesh.bench.cli", "load-test the mesh or the monolith baseline and report latency/throughput"),
    "plan": ("infermesh.bench.plan", "replicas and cost for a target rate, from a bench suite result"),
    "models": ("infermesh.models.cli", "model repository tools: bench (gRPC vs raw ONNX Runtime), quantize, import"),
    "drift": ("infermesh.drift.cli", "drift monitoring: baseline (a model's reference from your own feature data)"),
    "traces": ("infermesh.traces.cli", "receive OTLP traces and show them in a local web UI"),
    "features": ("infermesh.features.cli", "feature views: ingest CSV/Parquet files, list views, benchmark"),
    "profile": (
        "infermesh.profile",
        "sample every replica of a running mesh with py-spy under load: flame graphs + CPU per request",
    ),
    "status": ("infermesh.up.status", "the processes of a running `infermesh up`: pid, alive, restarts, last exit"),
    "chaos": (
        "infermesh.chaos",
        "fault scenarios under load against a mesh of its own: failed, degraded, p99, recovery",
    ),
    "jobs": ("infermesh.jobs.cli", "asynchronous bulk inference: submit a job file, status, wait, cancel"),
    "pipeline": ("infermesh.pipeline", "the pipeline file: check one against its views and model repository"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _up_parser(commands)
    for name, (module, summary) in DELEGATED.items():
        add_delegated(commands, name, module, summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    delegated = run_delegated(args, rest)
    if delegated is not None:
        return delegated
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())
