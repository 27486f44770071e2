"""`infermesh plan`: replicas per service and cost for a target rate, from a suite result.

Capacity comes from measured CPU time per request of each process kind at saturation
(the suite reads it from /proc): a single-threaded Python service replica can use at most
one core, so replicas = target rate x CPU seconds per request / target utilisation.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path


def plan(cpu_ms_per_request: dict[str, float], target_rps: float, utilisation: float, cores_per_machine: int,
         price_per_machine_hour: float) -> dict[str, object]:
    replicas = {
        role: max(1, math.ceil(target_rps * ms / 1000.0 / utilisation))
        for role, ms in sorted(cpu_ms_per_request.items())
        if role != "redis"
    }
    cores = sum(replicas.values())
    machines = max(1, math.ceil(cores / cores_per_machine))
    cost_per_million = machines * price_per_machine_hour / (target_rps * 3600.0) * 1_000_000
    return {
        "target_rps": target_rps,
        "utilisation": utilisation,
        "replicas": replicas,
        "cores": cores,
        "machines": machines,
        "cost_per_million_requests": round(cost_per_million, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infermesh plan", description=__doc__)
    p.add_argument("--from", dest="source", type=Path, default=Path("bench-results/suite.json"),
                   help="suite.json written by `infermesh bench --suite`")
    p.add_argument("--target-rps", type=float, required=True)
    p.add_argument("--utilisation", type=float, default=0.6, help="planned CPU utilisation per replica (headroom for p99)")
    p.add_argument("--cores-per-machine", type=int, default=2)
    p.add_argument("--price-per-hour", type=float, default=0.10, help="price of one machine-hour")
    args = p.parse_args(argv)
    if not args.source.is_file():
        p.error(f"{args.source} not found: run `infermesh bench --suite` first")
    suite = json.loads(args.source.read_text())
    cpu = suite.get("cpu_ms_per_request")
    if not cpu:
        p.error(f"{args.source} has no cpu_ms_per_request (not a suite result?)")
    if not 0 < args.utilisation <= 1 or args.target_rps <= 0:
        p.error("--utilisation must be in (0, 1] and --target-rps positive")
    result = plan(cpu, args.target_rps, args.utilisation, args.cores_per_machine, args.price_per_hour)
    print(f"for {args.target_rps:.0f} req/s at {args.utilisation:.0%} CPU per replica "
          f"(measured on {suite['machine']['cpu']}, {suite['machine']['cores']} cores):")
    for role, count in result["replicas"].items():  # type: ignore[union-attr]
        print(f"  {role:<10} {count} replica(s)   ({cpu[role]:.3f} CPU ms per request)")
    print(f"  = {result['cores']} cores on {result['machines']} machine(s) of {args.cores_per_machine} cores")
    print(f"cost: {result['cost_per_million_requests']:.4f} per million requests at {args.price_per_hour} per machine-hour")
    print(json.dumps(result))
    return 0
