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

from infermesh.cli_help import CommandParser, number, whole_number


def plan(
    cpu_ms_per_request: dict[str, float],
    target_rps: float,
    utilisation: float,
    cores_per_machine: int,
    price_per_machine_hour: float,
) -> dict[str, object]:
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


# Your own measurement (`infermesh bench --suite` writes it), else the one published with the
# checkout (docs/benchmarks.md), so that a fresh clone can plan before measuring.
OWN_SUITE = Path("bench-results/suite.json")
PUBLISHED_SUITE = Path(__file__).resolve().parents[2] / "docs" / "bench" / "suite.json"
DEFAULT_TARGET_RPS = 1000.0


def default_source() -> Path | None:
    """The suite result `plan` reads without --from: this machine's, else the published one."""
    for candidate in (OWN_SUITE, PUBLISHED_SUITE):
        if candidate.is_file():
            return candidate
    return None


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh plan", description=__doc__)
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help=f"suite.json written by `infermesh bench --suite` (default {OWN_SUITE}, else the published "
        "measurement docs/bench/suite.json of the checkout)",
    )
    p.add_argument(
        "--target-rps", type=number(above=0), default=DEFAULT_TARGET_RPS, help="the rate to plan for, requests/s"
    )
    p.add_argument(
        "--utilisation",
        type=number(above=0, at_most=1),
        default=0.6,
        help="planned CPU utilisation per replica (headroom for p99)",
    )
    p.add_argument("--cores-per-machine", type=whole_number(1), default=2, help="cores of one machine")
    p.add_argument("--price-per-hour", type=number(at_least=0), default=0.10, help="price of one machine-hour")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    source = args.source if args.source is not None else default_source()
    if source is None or not source.is_file():
        p.error(f"{source or OWN_SUITE} not found: run `infermesh bench --suite` first")
    try:
        suite = json.loads(source.read_text())
    except (OSError, ValueError) as error:
        p.error(f"{source} is not a readable suite result: {error}")
    cpu = suite.get("cpu_ms_per_request") if isinstance(suite, dict) else None
    if not cpu:
        p.error(f"{source} has no cpu_ms_per_request (not a suite result?)")
    result = plan(cpu, args.target_rps, args.utilisation, args.cores_per_machine, args.price_per_hour)
    machine = suite.get("machine", {})
    published = args.source is None and source != OWN_SUITE
    print(
        f"from {source}"
        + (" (the published measurement; `infermesh bench --suite` measures this machine)" if published else "")
    )
    print(
        f"for {args.target_rps:.0f} req/s at {args.utilisation:.0%} CPU per replica "
        f"(measured on {machine.get('cpu', 'an unknown CPU')}, {machine.get('cores', '?')} cores):"
    )
    for role, count in result["replicas"].items():  # type: ignore[union-attr]
        print(f"  {role:<10} {count} replica(s)   ({cpu[role]:.3f} CPU ms per request)")
    print(f"  = {result['cores']} cores on {result['machines']} machine(s) of {args.cores_per_machine} cores")
    cost = result["cost_per_million_requests"]
    print(f"cost: {cost:.4f} per million requests at {args.price_per_hour} per machine-hour")
    print(json.dumps(result))
    return 0
