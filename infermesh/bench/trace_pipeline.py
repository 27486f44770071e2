"""Tracing at 100%: the stock OpenTelemetry pipeline against the project's fast one, side by side.

    python -m infermesh.bench.trace_pipeline [--rounds 5] [--seconds 10] [--concurrency 32]
                                             [--out FILE] [--data-dir DIR]

Starts a private redis-server (the reference workload seeded into it), a trace receiver
(`infermesh traces`, OTLP/gRPC, its own process) and three meshes of the suite's shape at
once: tracing off, tracing at 100% with INFERMESH_TRACE_PIPELINE=stock (the SDK's tracer
and the OpenTelemetry exporter's encoder) and with =fast (services/runtime/lean_tracing.py
and otlp_encoding.py). Each round measures every mesh once, closed loop at --concurrency
over gRPC through Envoy, the order reversed every other round; each variant is reported by
its median round, with every round, and the CPU per request of each process kind (the
receiver's included) over the same runs. docs/benchmarks.md, "Tracing: stock or fast span pipeline".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from infermesh.bench import report
from infermesh.bench.loadgen import Plan
from infermesh.bench.report import cpu_seconds
from infermesh.bench.runs import measure
from infermesh.bench.suite import (
    DEFAULT_REPLICAS,
    compare,
    cpu_by_role,
    cpu_ms_per_request,
    median_run,
    running_mesh,
    trace_receiver,
)
from infermesh.bench.targets import factory
from infermesh.settings import add_data_dir_argument
from infermesh.up.supervisor import free_port, start_redis
from infermesh.workload.seed import seed_all

# label -> the mesh's environment beyond the receiver's endpoint (None: tracing off).
VARIANTS: dict[str, dict[str, str] | None] = {
    "off": None,
    "100% stock": {"INFERMESH_TRACE_PIPELINE": "stock"},
    "100% fast": {"INFERMESH_TRACE_PIPELINE": "fast"},
}


def tracing_env(endpoint: str, pipeline: dict[str, str]) -> dict[str, str]:
    """Every request traced (Envoy starts each trace, the services follow), exported to `endpoint`."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        **pipeline,
    }


def run(data_dir: Path, rounds: int, seconds: float, warmup: float, concurrency: int, progress: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": report.machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "concurrency": concurrency,
        "seconds_per_measurement": seconds,
        "rounds": rounds,
    }
    with tempfile.TemporaryDirectory(prefix="infermesh-trace-pipeline-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        redis_port = free_port()
        redis = start_redis(work, redis_port, work / "logs", persist=False)
        stack.callback(redis.wait, timeout=10)
        stack.callback(redis.terminate)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        data_dir = data_dir.resolve()
        print(f"seeding the reference workload into a private Redis ({redis_url})", flush=True)
        seed_all(data_dir, redis_url, progress=progress)
        receiver = stack.enter_context(trace_receiver(work))
        meshes = {
            label: stack.enter_context(
                running_mesh(
                    data_dir, redis_url, DEFAULT_REPLICAS, None if env is None else tracing_env(receiver.endpoint, env)
                )
            )
            for label, env in VARIANTS.items()
        }
        edges = {
            label: factory("grpc", address=f"127.0.0.1:{mesh.topology.edge_port}") for label, mesh in meshes.items()
        }
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in VARIANTS}
        for turn in range(rounds):
            order = list(VARIANTS) if turn % 2 == 0 else list(reversed(VARIANTS))
            for label in order:
                name = f"{label} c={concurrency} round {turn + 1}"
                before = {**cpu_by_role(meshes[label]), "trace receiver": cpu_seconds(receiver.pid)}
                plan = Plan("closed", seconds, warmup, concurrency=concurrency)
                result = measure(edges[label], plan, 1, name, progress).to_json()
                after = {**cpu_by_role(meshes[label]), "trace receiver": cpu_seconds(receiver.pid)}
                result["cpu_ms_per_request"] = cpu_ms_per_request(before, after, result["ok"])
                runs[label].append(result)
                print(f"{name}: {result['rps']:.1f} req/s, p50 {result['latency_ms'].get('p50')} ms", flush=True)
    results["variants"] = {label: median_run(variant_runs) for label, variant_runs in runs.items()}
    results["summary"] = compare(runs, "off")
    stock, fast = results["summary"]["100% stock"], results["summary"]["100% fast"]
    results["fast_over_stock_throughput"] = round(fast["rps"] / stock["rps"] - 1, 4) if stock["rps"] else None
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infermesh.bench.trace_pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="measurements of each variant, in turns (default %(default)s)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default %(default)s)")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before each run (default %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_dir_argument(parser, "where the reference model is (made there if missing)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds and --concurrency must be 1 or more, --seconds above 0")
    results = run(args.data_dir, args.rounds, args.seconds, args.warmup, args.concurrency, not args.no_progress)
    if args.out is not None:  # before anything else that could fail
        report.write_json(args.out, results)
    print(report.TABLE_HEAD)
    for label, result in results["variants"].items():
        print(report.latency_row(f"tracing {label} c={args.concurrency}", result))
    print(json.dumps(results["summary"], indent=2))
    print(f"fast vs stock throughput: {results['fast_over_stock_throughput']:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
