"""`python -m infermesh.envoy render|check` (also `infermesh envoy ...`), and the edge flags
`infermesh up` shares.

    python -m infermesh.envoy render --replicas scoring=2,features=1 --out x.json
    python -m infermesh.envoy render --edge-rate-limit 500 --api-key-file keys.txt
    python -m infermesh.envoy check     # envoy/local.json is up to date
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from infermesh.certs import CertPaths
from infermesh.cli_help import CommandParser
from infermesh.envoy.bootstrap import (
    DEFAULT_DESCRIPTOR_SET,
    LOCAL_CONFIG,
    local_config_is_fresh,
    render,
    to_json,
    write,
)
from infermesh.envoy.common import REPO_ROOT
from infermesh.envoy.edge_policy import (
    ADMISSION_MIN_CONCURRENCY,
    DEFAULT_ADMISSION_LATENCY_MS,
    EdgePolicy,
    load_api_keys,
)
from infermesh.envoy.process import EnvoyError, validate
from infermesh.envoy.tracing import Tracing
from services.runtime.topology import DEFAULT_ADMIN_PORT, DEFAULT_EDGE_PORT, SERVICES, local_topology


def parse_replicas(text: str) -> dict[str, int]:
    """`scoring=2,features=1` -> {"scoring": 2, "features": 1}."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in SERVICES:
            raise ValueError(f"bad replica spec {item!r}; expected NAME=COUNT, NAME in {SERVICES}")
        try:
            counts[name] = int(value)
        except ValueError:
            raise ValueError(f"bad replica count in {item!r}") from None
    return counts


def add_edge_arguments(parser: argparse.ArgumentParser) -> None:
    """The edge policy and TLS flags (shared by `envoy render` and `infermesh up`)."""
    parser.add_argument(
        "--edge-rate-limit",
        type=int,
        default=None,
        metavar="RPS",
        help="admit at most RPS requests/s at the edge (429 for REST, RESOURCE_EXHAUSTED for gRPC); default: no limit",
    )
    parser.add_argument(
        "--edge-rate-burst",
        type=int,
        default=None,
        metavar="N",
        help="with --edge-rate-limit: requests admitted at once after a quiet spell (default: RPS)",
    )
    parser.add_argument(
        "--edge-shed-latency",
        type=int,
        default=DEFAULT_ADMISSION_LATENCY_MS,
        metavar="MS",
        help="shed load at the edge once the gateway's median latency passes MS milliseconds "
        f"(beyond {ADMISSION_MIN_CONCURRENCY} calls in flight, the excess gets 429 / RESOURCE_EXHAUSTED "
        "at once); 0 turns load shedding off; default %(default)s",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="require an API key at the edge (x-api-key or authorization: Bearer); FILE has one "
        "CLIENT:KEY per line; default: no authentication",
    )
    parser.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help="TLS at the edge and mTLS from Envoy to the services, with the certificates "
        "`infermesh certs` wrote to DIR; default: plaintext",
    )


def edge_policy_from_args(args: argparse.Namespace) -> EdgePolicy:
    """EdgePolicy of the add_edge_arguments flags; ValueError names what is wrong."""
    if args.edge_rate_burst is not None and args.edge_rate_limit is None:
        raise ValueError("--edge-rate-burst needs --edge-rate-limit")
    keys = load_api_keys(args.api_key_file) if args.api_key_file is not None else ()
    shed_latency = args.edge_shed_latency or None  # 0: off
    return EdgePolicy(args.edge_rate_limit, args.edge_rate_burst, keys, admission_latency_ms=shed_latency)


def build_parser(prog: str = "infermesh envoy") -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description="Render Envoy configs for the mesh.")
    commands = parser.add_subparsers(dest="command", required=True)
    rend = commands.add_parser("render", help="render a static Envoy bootstrap as JSON")
    rend.add_argument(
        "--replicas", default="", help="e.g. scoring=2,features=1 (default: scoring=2, one of each other service)"
    )
    rend.add_argument("--edge-port", type=int, default=DEFAULT_EDGE_PORT, help="REST + gRPC edge port")
    rend.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT, help="Envoy admin port, on 127.0.0.1")
    rend.add_argument(
        "--descriptor-set",
        type=Path,
        default=DEFAULT_DESCRIPTOR_SET,
        help="proto descriptor set for the transcoder (relative to Envoy's cwd)",
    )
    rend.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export Envoy's spans over OTLP/gRPC to this collector (http://host:4317)",
    )
    rend.add_argument(
        "--sampling-percent",
        type=float,
        default=100.0,
        help="with --otlp-endpoint: share of new traces Envoy samples (default %(default)s)",
    )
    add_edge_arguments(rend)
    rend.add_argument("--out", type=Path, help="output file (stdout when omitted)")
    rend.add_argument("--validate", action="store_true", help="check it with envoy --mode validate")
    check = commands.add_parser("check", help=f"fail if {LOCAL_CONFIG} is stale")
    check.add_argument(
        "--repo-root", type=Path, default=REPO_ROOT, help="the checkout to check (default: the one infermesh runs from)"
    )
    return parser


def _render_command(args: argparse.Namespace) -> int:
    topology = local_topology(
        parse_replicas(args.replicas),
        descriptor_set=args.descriptor_set,
        edge_port=args.edge_port,
        admin_port=args.admin_port,
    )
    tracing = Tracing(args.otlp_endpoint, args.sampling_percent) if args.otlp_endpoint else None
    edge = edge_policy_from_args(args)
    tls = CertPaths.checked(args.tls) if args.tls is not None else None
    if args.out is not None:
        write(topology, args.out, tracing, edge, tls)
        if args.validate:
            validate(args.out, cwd=Path.cwd())
        return 0
    if args.validate:
        with tempfile.TemporaryDirectory() as tmp:
            validate(write(topology, Path(tmp) / "envoy.json", tracing, edge, tls), cwd=Path.cwd())
    sys.stdout.write(to_json(render(topology, tracing, edge, tls)))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "infermesh envoy") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "render":
            return _render_command(args)
        if local_config_is_fresh(args.repo_root):
            return 0
        print(
            f"{LOCAL_CONFIG} is stale: run `python -m infermesh.envoy render --out {LOCAL_CONFIG}` from the repo root",
            file=sys.stderr,
        )
        return 1
    except (ValueError, EnvoyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
