"""`infermesh bench`: load-test any edge (or the monolith baseline) and report honestly.

Examples:
  infermesh bench --target grpc --address 127.0.0.1:8080 --mode closed --concurrency 32
  infermesh bench --target rest --url http://127.0.0.1:8080/v1/recommend --mode open --rate 500
  infermesh bench --target grpc --mode ramp --rates 200,400,600,800,1000 --slo-p99-ms 25
  infermesh bench --target rest --plot                 # a ramp, drawn to bench-results/ramp.png
  infermesh bench --suite --out-dir bench-results      # every scenario of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infermesh.bench import report
from infermesh.bench.loadgen import Plan, TargetFactory
from infermesh.bench.runs import measure, ramp
from infermesh.bench.targets import factory
from infermesh.cli_help import CommandParser, RawDescriptionDefaultsHelpFormatter
from infermesh.settings import LOCAL_REDIS_URL, add_data_dir_argument, tools_redis_target, tools_redis_url
from services.runtime.redis_keys import DEFAULT_NAMESPACE
from services.runtime.settings import SettingsError

DEFAULT_PLOT = Path("bench-results/ramp.png")


def _target_from_args(args: argparse.Namespace) -> TargetFactory:
    if args.target == "grpc":
        return factory("grpc", address=args.address)
    if args.target == "rest":
        return factory("rest", url=args.url)
    if args.target == "monolith":
        from infermesh.workload.seed import model_path

        # INFERMESH_REDIS_* credentials, or the password `infermesh up` keeps in the data dir;
        # refused ones stop the run here, in one line, rather than fail every request.
        redis = tools_redis_target(args.redis_url, args.data_dir)
        redis.check()
        return factory(
            "monolith",
            redis=redis,
            model_path=str(model_path(args.data_dir)),
            namespace=args.namespace,
        )
    if args.target == "scoring":
        return factory("scoring", address=args.address, batch=args.batch)
    from infermesh.workload.seed import model_path

    return factory("onnxruntime", model_path=str(model_path(args.data_dir)), batch=args.batch)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh bench", description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter)
    p.add_argument("--suite", action="store_true", help="run every scenario (starts its own Redis and meshes)")
    p.add_argument(
        "--target",
        choices=["grpc", "rest", "monolith", "scoring", "onnxruntime"],
        default="grpc",
        help="what to load: the edge over gRPC or REST, the one-process monolith baseline, "
        "the scoring service or ONNX Runtime alone",
    )
    p.add_argument("--address", default="127.0.0.1:8080", help="gRPC edge (or scoring) address")
    p.add_argument("--url", default="http://127.0.0.1:8080/v1/recommend", help="REST endpoint")
    p.add_argument(
        "--mode",
        choices=["closed", "open", "ramp"],
        default=None,
        help="closed loop (--concurrency clients), open loop (--rate), or open loop at each of --rates "
        "(default: ramp with --plot, else closed)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, default=200.0, help="open loop: requests/s")
    p.add_argument("--rates", default="100,200,400,600,800,1000,1200", help="ramp: comma-separated rates")
    p.add_argument(
        "--slo-p99-ms",
        type=float,
        default=25.0,
        help="ramp: the p99 a sustainable rate keeps under (the first step to miss is measured again)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (warm-up excluded)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--processes", type=int, default=1, help="client processes (when one cannot keep up)")
    p.add_argument("--batch", type=int, default=256, help="scoring / onnxruntime targets: rows per call")
    p.add_argument(
        "--redis-url",
        default=tools_redis_url(),
        help=f"monolith target: its Redis (default $INFERMESH_REDIS_URL, $REDIS_URL or {LOCAL_REDIS_URL})",
    )
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="monolith target: key prefix of the catalog")
    add_data_dir_argument(p, "where the reference model is (monolith, scoring, onnxruntime targets)")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        nargs="?",
        const=DEFAULT_PLOT,
        help=f"ramp: draw latency percentiles against offered rate into this PNG ({DEFAULT_PLOT} if none is given)",
    )
    p.add_argument("--out-dir", type=Path, default=Path("bench-results"), help="suite: where results go")
    p.add_argument("--quick", action="store_true", help="suite: short steps (a smoke run, not for publishing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _sustainable_line(outcome: dict[str, Any], slo_p99_ms: float) -> str:
    """The ramp's verdict; when even its lowest rate missed, "0 req/s" alone would read as
    "nothing works": say which rate missed by how much and what to try."""
    line = f"max sustainable open-loop rate with p99 <= {slo_p99_ms:g} ms: {outcome['max_sustainable_rps']:.0f} req/s"
    steps = outcome["steps"]
    if outcome["max_sustainable_rps"] or not steps:
        return line
    lowest = steps[0]
    rate = lowest["offered_rps"]
    return (
        f"{line}: the lowest rate tried, {rate:g} req/s, had p99 {lowest['latency_ms']['p99']:.1f} ms; "
        f"lower rates were not tried (e.g. --rates {rate / 4:g},{rate / 2:g},{rate:g})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode is None:
        args.mode = "ramp" if args.plot else "closed"
    elif args.plot and args.mode != "ramp":
        parser.error(f"--plot draws a ramp: use --mode ramp (or leave --mode out), not --mode {args.mode}")
    progress = not args.no_progress and sys.stderr.isatty()
    if args.suite:
        from infermesh.bench.suite import run_suite

        return run_suite(args.out_dir, quick=args.quick, progress=progress)
    try:
        target = _target_from_args(args)
    except SettingsError as error:
        print(f"infermesh bench: {error}", file=sys.stderr)
        return 1
    document: dict[str, Any] = {"machine": report.machine(), "target": args.target, "argv": sys.argv[1:]}
    if args.mode == "ramp":
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        outcome = ramp(target, rates, args.slo_p99_ms, args.duration, args.warmup, args.processes, progress)
        document["ramp"] = outcome
        print(report.TABLE_HEAD)
        for step in outcome["steps"]:
            if "first_try" in step:
                print(report.latency_row(f"{args.target} (missed; measured again)", step["first_try"]))
            print(report.latency_row(args.target, step))
        print(_sustainable_line(outcome, args.slo_p99_ms))
    else:
        plan = Plan(args.mode, args.duration, args.warmup, concurrency=args.concurrency, rate=args.rate)
        result = measure(target, plan, args.processes, args.target, progress).to_json()
        if args.target in ("scoring", "onnxruntime"):
            result["items_per_s"] = round(result["rps"] * args.batch, 1)
        document["result"] = result
        print(report.TABLE_HEAD)
        print(report.latency_row(args.target, result))
        if result["errors"]:
            print("errors:", result["errors"])
    # The results first: a run of minutes must not be lost to what can fail after it (the plot).
    if args.out:
        report.write_json(args.out, document)
        print(f"wrote {args.out}")
    if args.mode == "ramp" and args.plot:
        try:
            report.plot_ramps(args.plot, {args.target: document["ramp"]["steps"]}, args.slo_p99_ms)
        except ImportError as error:
            print(
                f"infermesh bench: --plot needs matplotlib, the bench extra: pip install 'infermesh[bench]' ({error})",
                file=sys.stderr,
            )
            return 1
        print(f"wrote {args.plot}")
    return 0
