"""`infermesh bench --suite`: every published scenario in one run, on one machine.

Starts its own redis-server and meshes on free ports (never the user's running mesh),
measures, and writes suite.json and ramp.png to the output folder (docs/bench for
docs/benchmarks.md).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infermesh.bench import report
from infermesh.bench.loadgen import Plan
from infermesh.bench.report import cpu_seconds
from infermesh.bench.runs import measure, ramp
from infermesh.bench.targets import factory
from infermesh.up.lanes import BulkLane
from infermesh.up.supervisor import Mesh, free_port, free_topology, port_is_free, start_redis
from infermesh.workload.seed import model_path, model_repository, seed_all
from services.runtime.topology import SERVICES

DEFAULT_REPLICAS = {"gateway": 1, "features": 1, "scoring": 2, "ranking": 1}
SLO_P99_MS = 25.0
RAMP_RATES = (25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400)
SCORING_BATCHES = (1, 64, 256, 1024)


@contextmanager
def running_mesh(
    data_dir: Path,
    redis_url: str,
    replicas: dict[str, int],
    env: dict[str, str] | None = None,
    models: Path | None = None,
    bulk: BulkLane | None = None,
) -> Iterator[Mesh]:
    mesh = Mesh(
        topology=free_topology(replicas),
        data_dir=data_dir,
        redis_url=redis_url,
        model_repository=models or model_repository(data_dir),
        log_dir=data_dir / "logs",
        extra_env={"LOG_LEVEL": "WARNING", **(env or {})},
        bulk=bulk,
    )
    try:
        mesh.start(timeout=120)
        yield mesh
    finally:
        mesh.stop()


ROUNDS = 3  # turns of the side-by-side comparisons (tracing, shadow)
TRACING = (("off", None), ("1%", "0.01"), ("100%", "1.0"))
# Cross-request coalescing in the gateway (GATEWAY_COALESCE): the default is on.
COALESCING = (("off", {"GATEWAY_COALESCE": "false"}), ("on", {"GATEWAY_COALESCE": "true"}))


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, with every round's figures attached."""
    chosen = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    rounds = [
        {
            "rps": r["rps"],
            "p50_ms": r["latency_ms"].get("p50"),
            **({"cpu_ms_per_request": r["cpu_ms_per_request"]} if "cpu_ms_per_request" in r else {}),
        }
        for r in runs
    ]
    return {**chosen, "rounds": rounds}


def compare(runs: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """Per variant: median throughput and p50 over the rounds, and their change vs baseline."""

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    summary = {
        label: {"rps": median([r["rps"] for r in rs]), "p50_ms": median([r["latency_ms"]["p50"] for r in rs])}
        for label, rs in runs.items()
    }
    for label, rs in runs.items():
        if all("cpu_ms_per_request" in r for r in rs):
            summary[label]["cpu_ms_per_request"] = round(median([sum(r["cpu_ms_per_request"].values()) for r in rs]), 3)
    base = summary[baseline]
    for figures in summary.values():
        figures["throughput_change"] = round(figures["rps"] / base["rps"] - 1, 4) if base["rps"] else None
        figures["p50_change"] = round(figures["p50_ms"] / base["p50_ms"] - 1, 4) if base["p50_ms"] else None
    return summary


EXPERIMENT_PRIMARY_ONLY = """name: bench-shadow
arms:
  - {name: control, model: ranker, version: "1", percent: 100}
"""
EXPERIMENT_SHADOW = """shadow: {model: ranker, version: "2", percent: 100}
"""


def shadow_repository(work: Path, data_dir: Path) -> Path:
    """A model repository with the reference ranker as versions 1 and 2 (the shadow)."""
    source = model_repository(data_dir)
    target = work / "models"
    shutil.copytree(source, target)
    model = target / "ranker"
    shutil.copytree(model / "1", model / "2")
    config = json.loads((model / "config.json").read_text())
    config["version_policy"] = {"all": {}}  # serve both, not only the newest
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return target


@dataclass(frozen=True)
class TraceReceiver:
    endpoint: str  # what OTEL_EXPORTER_OTLP_ENDPOINT says
    pid: int


@contextmanager
def trace_receiver(work: Path) -> Iterator[TraceReceiver]:
    """`infermesh traces` in a child process, the OTLP endpoint the services export to."""
    otlp_port, http_port = free_port(), free_port()
    log = open(work / "traces.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infermesh.cli",
            "traces",
            "--otlp-port",
            str(otlp_port),
            "--http-port",
            str(http_port),
            "--max-traces",
            "500",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while port_is_free(otlp_port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the trace receiver did not start; see {work / 'traces.log'}")
            time.sleep(0.1)
        yield TraceReceiver(f"http://127.0.0.1:{otlp_port}", process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def side_by_side(
    meshes: dict[str, Mesh],
    edges: dict[str, Any],
    concurrency: int,
    rounds: int,
    closed: Any,
    record: Any,
    what: str,
) -> dict[str, Any]:
    """Each variant's mesh measured in turns, `rounds` times; CPU per request by process kind
    from the same runs; each variant reported by its median round, compared with the first."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in meshes}
    for turn in range(rounds):
        for label, mesh in meshes.items():
            before = cpu_by_role(mesh)
            run = closed(edges[label], concurrency, f"{what} {label} c={concurrency} round {turn + 1}")
            run["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_by_role(mesh), run["ok"])
            runs[label].append(run)
    for label in meshes:
        record(f"mesh {what} {label} c={concurrency}", median_run(runs[label]))
    return compare(runs, next(iter(meshes)))


# A reference Recommend's request and answer are about 2 KB each on the wire.
FLOOR_PAYLOAD_BYTES = 2048


def hop_floor(seconds: float) -> dict[str, Any]:
    """What bare grpc.aio hops cost here (infermesh.bench.rpc_floor, same run): the floor
    under the mesh's latency at c=1 and under its CPU per request at c=32."""
    argv = [
        sys.executable,
        "-m",
        "infermesh.bench.rpc_floor",
        "--json",
        "--concurrency",
        "1,32",
        "--payload-bytes",
        str(FLOOR_PAYLOAD_BYTES),
        "--seconds",
        str(max(2.0, seconds / 2)),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout)


def coalesced_floor(floor: dict[str, Any], monolith_cpu_ms: float, monolith_rps: float) -> dict[str, float] | None:
    """The best a mesh can do if coalescing made its internal hops free: every request still
    pays one edge hop (client, Envoy, gateway server; bare, at c=32) plus the pipeline's own
    work, which the monolith's CPU per request stands for."""
    loaded = [r for r in floor.get("rows", []) if r["path"] == "envoy" and r["concurrency"] > 1]
    if not loaded or not monolith_rps:
        return None
    row = loaded[0]
    edge_hop_ms = (
        row["client_us_per_call"] + (row["server_us_per_call"] or 0) + (row["envoy_us_per_call"] or 0)
    ) / 1000
    cpu_ms = edge_hop_ms + monolith_cpu_ms
    cores = floor.get("recommend_floor", {}).get("cores", 1)
    rps = cores * 1000.0 / cpu_ms
    return {
        "edge_hop_cpu_ms": round(edge_hop_ms, 3),
        "cpu_ms_per_request": round(cpu_ms, 3),
        "max_requests_per_s": round(rps),
        "over_monolith": round(rps / monolith_rps, 3),
    }


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (the load worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    return {role: round((after[role] - before.get(role, 0.0)) * 1000 / max(1, requests), 3) for role in after}


def cpu_by_role(mesh: Mesh) -> dict[str, float]:
    totals: dict[str, float] = {}
    for child in mesh.children:
        with suppress(OSError, IndexError, ValueError):
            totals[child.role] = totals.get(child.role, 0.0) + cpu_seconds(child.process.pid)
    return totals


def run_suite(out_dir: Path, quick: bool = False, progress: bool = True) -> int:
    seconds, warmup = (2.0, 0.5) if quick else (10.0, 2.0)
    ramp_seconds = 2.0 if quick else 8.0
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": report.machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": quick,
        "seconds_per_measurement": seconds,
        "scenarios": {},
        "ramps": {},
        "tracing": {},
    }
    scenarios = results["scenarios"]

    def record(name: str, result: dict[str, Any]) -> None:
        scenarios[name] = result
        print(report.latency_row(name, result), flush=True)

    with tempfile.TemporaryDirectory(prefix="infermesh-bench-") as tmp:
        work = Path(tmp)
        redis_port = free_port()
        redis = start_redis(work, redis_port, work / "logs", persist=False)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        try:
            data_dir = Path(".infermesh").resolve()
            print(f"seeding the reference workload into a private Redis ({redis_url})", flush=True)
            seed_all(data_dir, redis_url, progress=progress)
            model = str(model_path(data_dir))
            print(report.TABLE_HEAD, flush=True)

            def closed(target: Any, concurrency: int, label: str, processes: int = 1) -> dict[str, Any]:
                return measure(
                    target, Plan("closed", seconds, warmup, concurrency=concurrency), processes, label, progress
                ).to_json()

            # --- the monolith baseline: same Redis reads, model and ranking code, no RPC
            mono = factory("monolith", redis=redis_url, model_path=model, namespace="infermesh:v1")
            record("monolith c=1", closed(mono, 1, "monolith c=1"))
            before = children_cpu_seconds()
            mono_saturated = closed(mono, 32, "monolith c=32", processes=2)
            # The load processes run the monolith itself: their CPU (client loop included) per request.
            results["monolith_cpu_ms_per_request"] = round(
                (children_cpu_seconds() - before) * 1000 / max(1, mono_saturated["ok"]), 3
            )
            record("monolith c=32 (2 processes)", mono_saturated)
            results["floor"] = hop_floor(seconds)

            # --- the default mesh
            with running_mesh(data_dir, redis_url, DEFAULT_REPLICAS) as mesh:
                edge = f"127.0.0.1:{mesh.topology.edge_port}"
                gateway = mesh.topology.replicas["gateway"][0].address
                grpc_edge = factory("grpc", address=edge)
                record("mesh gRPC via Envoy c=1", closed(grpc_edge, 1, "edge c=1"))
                record(
                    "mesh REST via Envoy c=1", closed(factory("rest", url=f"http://{edge}/v1/recommend"), 1, "rest c=1")
                )
                record("mesh gRPC direct to gateway c=1", closed(factory("grpc", address=gateway), 1, "direct c=1"))
                before = cpu_by_role(mesh)
                saturated = closed(grpc_edge, 32, "edge c=32")
                after = cpu_by_role(mesh)
                record("mesh gRPC via Envoy c=32", saturated)
                results["cpu_ms_per_request"] = cpu_ms_per_request(before, after, saturated["ok"])
                results["replicas"] = DEFAULT_REPLICAS
                record("mesh gRPC direct to gateway c=32", closed(factory("grpc", address=gateway), 32, "direct c=32"))
                results["ramps"]["mesh via Envoy, coalescing on"] = ramp(
                    grpc_edge, RAMP_RATES, SLO_P99_MS, ramp_seconds, warmup, 1, progress, "mesh ramp"
                )
                # scoring alone against raw ONNX Runtime on the same batch sizes
                scoring = mesh.topology.replicas["scoring"][0].address
                items: dict[str, Any] = {}
                for batch in SCORING_BATCHES:
                    via = closed(factory("scoring", address=scoring, batch=batch), 1, f"scoring b={batch}")
                    raw = closed(factory("onnxruntime", model_path=model, batch=batch), 1, f"onnxruntime b={batch}")
                    items[str(batch)] = {
                        "grpc_items_per_s": round(via["rps"] * batch),
                        "onnxruntime_items_per_s": round(raw["rps"] * batch),
                        "ratio": round(via["rps"] / raw["rps"], 3) if raw["rps"] else None,
                        "grpc_p50_ms": via["latency_ms"].get("p50"),
                        "onnxruntime_p50_ms": raw["latency_ms"].get("p50"),
                    }
                results["scoring_items_per_s"] = items

            # --- coalescing off / on: two meshes side by side, measured in turns
            rounds = 1 if quick else ROUNDS
            with ExitStack() as stack:
                meshes = {
                    label: stack.enter_context(running_mesh(data_dir, redis_url, DEFAULT_REPLICAS, env))
                    for label, env in COALESCING
                }
                edges = {
                    label: factory("grpc", address=f"127.0.0.1:{m.topology.edge_port}") for label, m in meshes.items()
                }
                results["coalescing"] = {
                    f"c={concurrency}": side_by_side(meshes, edges, concurrency, rounds, closed, record, "coalescing")
                    for concurrency in (1, 32)
                }
                results["ramps"]["mesh via Envoy, coalescing off"] = ramp(
                    edges["off"],
                    RAMP_RATES,
                    SLO_P99_MS,
                    ramp_seconds,
                    warmup,
                    1,
                    progress,
                    "mesh ramp (coalescing off)",
                )

            # --- tracing off / 1% / 100% and shadow traffic off / on: small differences on a
            # noisy machine, so the variants run side by side and are measured in turns
            # (ROUNDS rounds), each reported by its median round.
            with trace_receiver(work) as receiver, ExitStack() as stack:
                edges, meshes = {}, {}
                for label, ratio in TRACING:
                    env = (
                        {}
                        if ratio is None
                        else {
                            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                            "OTEL_TRACES_SAMPLER_ARG": ratio,
                        }
                    )
                    mesh = meshes[label] = stack.enter_context(running_mesh(data_dir, redis_url, DEFAULT_REPLICAS, env))
                    edges[label] = factory("grpc", address=f"127.0.0.1:{mesh.topology.edge_port}")
                for concurrency in (1, 32):
                    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in TRACING}
                    for turn in range(rounds):
                        for label, _ in TRACING:
                            name = f"tracing {label} c={concurrency} round {turn + 1}"
                            # CPU per request by process kind, the trace receiver's included:
                            # where tracing's cost goes, from the same run.
                            before = {**cpu_by_role(meshes[label]), "trace receiver": cpu_seconds(receiver.pid)}
                            run = closed(edges[label], concurrency, name)
                            after = {**cpu_by_role(meshes[label]), "trace receiver": cpu_seconds(receiver.pid)}
                            run["cpu_ms_per_request"] = cpu_ms_per_request(before, after, run["ok"])
                            runs[label].append(run)
                    for label, _ in TRACING:
                        record(f"mesh tracing {label} c={concurrency}", median_run(runs[label]))
                    results["tracing"][f"c={concurrency}"] = compare(runs, "off")

            # Shadow: one mesh whose experiments file is switched between "all traffic to
            # version 1" and the same plus a shadow copy of every scoring call to version 2.
            repository = shadow_repository(work, data_dir)
            experiments = work / "experiments.yaml"
            experiments.write_text(EXPERIMENT_PRIMARY_ONLY)
            env = {"GATEWAY_EXPERIMENTS_FILE": str(experiments), "GATEWAY_EXPERIMENTS_RELOAD_SECONDS": "0.5"}
            shadow_runs: dict[str, list[dict[str, Any]]] = {"off": [], "100%": []}
            with running_mesh(data_dir, redis_url, DEFAULT_REPLICAS, env, models=repository) as mesh:
                edge = factory("grpc", address=f"127.0.0.1:{mesh.topology.edge_port}")
                for turn in range(rounds):
                    for label, text in (("off", ""), ("100%", EXPERIMENT_SHADOW)):
                        experiments.write_text(EXPERIMENT_PRIMARY_ONLY + text)
                        time.sleep(2)  # the gateway re-reads the file every 0.5 s
                        shadow_runs[label].append(closed(edge, 1, f"shadow {label} c=1 round {turn + 1}"))
            for label, runs_of_label in shadow_runs.items():
                record(f"mesh shadow {label} c=1", median_run(runs_of_label))
            results["shadow"] = compare(shadow_runs, "off")

            results["ramps"]["monolith"] = ramp(
                mono, RAMP_RATES, SLO_P99_MS, ramp_seconds, warmup, 1, progress, "monolith ramp"
            )

            # --- replicas: one of each vs two of each
            for label, replicas in (("1 each", {s: 1 for s in SERVICES}), ("2 each", {s: 2 for s in SERVICES})):
                with running_mesh(data_dir, redis_url, replicas) as mesh:
                    edge = f"127.0.0.1:{mesh.topology.edge_port}"
                    record(
                        f"mesh replicas {label} c=32", closed(factory("grpc", address=edge), 32, f"replicas {label}")
                    )
        finally:
            redis.terminate()
            redis.wait(timeout=10)

    mono_rps = scenarios["monolith c=32 (2 processes)"]["rps"]
    mesh_rps = scenarios["mesh gRPC via Envoy c=32"]["rps"]
    results["mesh_over_monolith_throughput"] = round(mesh_rps / mono_rps, 3) if mono_rps else None
    results["coalesced_floor"] = coalesced_floor(results["floor"], results["monolith_cpu_ms_per_request"], mono_rps)
    report.write_json(out_dir / "suite.json", results)
    report.plot_ramps(out_dir / "ramp.png", {k: v["steps"] for k, v in results["ramps"].items()}, SLO_P99_MS)
    summary = [
        f"mesh/monolith throughput at saturation: {results['mesh_over_monolith_throughput']}",
        f"bare hops, same run: {results['floor'].get('recommend_floor', results['floor'])}",
        f"a mesh whose internal hops cost nothing (one edge hop + the monolith's work): {results['coalesced_floor']}",
        *(
            f"max sustainable open-loop rate ({k}, p99 <= {SLO_P99_MS:g} ms): {v['max_sustainable_rps']:.0f} req/s"
            for k, v in results["ramps"].items()
        ),
        f"shadow traffic (100% of scoring calls copied), c=1: {results['shadow']['100%']}",
        *(f"tracing {c}: {v}" for c, v in results["tracing"].items()),
        f"CPU ms per request by process kind: {results['cpu_ms_per_request']}",
        f"monolith CPU ms per request: {results['monolith_cpu_ms_per_request']}",
        *(f"coalescing {c}: {v}" for c, v in results["coalescing"].items()),
    ]
    print("\n".join(summary))
    print(f"wrote {out_dir / 'suite.json'} and {out_dir / 'ramp.png'}")
    return 0
