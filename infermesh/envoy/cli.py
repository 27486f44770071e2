"""`python -m infermesh.envoy render|check` (also `infermesh envoy ...`), and the edge flags
`infermesh up` shares.

    python -m infermesh.envoy render --replicas scoring=2,features=1 --out x.json
    python -m infermesh.envoy render --edge-rate-limit 500 --api-key-file keys.txt
    python -m infermesh.envoy render --jwt-issuer https://idp.example --jwt-audience infermesh \
        --jwt-jwks-uri https://idp.example/.well-known/jwks.json --edge-caller-rate-limit 50
    python -m infermesh.envoy check     # envoy/local.json is up to date
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from infermesh.certs import CertPaths
from infermesh.cli_help import CommandParser, port
from infermesh.envoy.bootstrap import (
    INSTALLED_DESCRIPTOR_SET,
    LOCAL_CONFIG,
    local_config_is_fresh,
    render,
    to_json,
    write,
)
from infermesh.envoy.common import REPO_ROOT
from infermesh.envoy.edge_auth import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_JWKS_CACHE_S,
    JwtAuth,
    check_jwks_file,
    system_ca_bundle,
)
from infermesh.envoy.edge_policy import (
    ADMISSION_MIN_CONCURRENCY,
    DEFAULT_ADMISSION_LATENCY_MS,
    EDGE_AUTH_CHOICES,
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
    add_jwt_arguments(parser)
    parser.add_argument(
        "--edge-auth",
        choices=EDGE_AUTH_CHOICES,
        default=None,
        help="what the edge accepts: API keys, JWTs or either; default: what is configured "
        "(--api-key-file, --jwt-issuer), either when both are",
    )
    parser.add_argument(
        "--edge-caller-rate-limit",
        type=int,
        default=None,
        metavar="RPS",
        help="admit at most RPS requests/s from each caller (API-key client or JWT subject), in a bucket of "
        "its own: one caller over its limit gets 429 / RESOURCE_EXHAUSTED, the others do not; needs "
        "--api-key-file or --jwt-issuer; default: no limit",
    )
    parser.add_argument(
        "--edge-caller-rate-burst",
        type=int,
        default=None,
        metavar="N",
        help="with --edge-caller-rate-limit: requests a caller may send at once after a quiet spell (default: RPS)",
    )
    parser.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help="TLS at the edge and mTLS from Envoy to the services, with the certificates "
        "`infermesh certs` wrote to DIR; default: plaintext",
    )


def add_jwt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jwt-issuer",
        default=None,
        metavar="ISS",
        help="accept bearer JWTs at the edge from this issuer (their `iss`), signed by a key of "
        "--jwt-jwks-file or --jwt-jwks-uri, for one of the --jwt-audience; default: no JWT",
    )
    parser.add_argument(
        "--jwt-audience",
        action="append",
        default=[],
        metavar="AUD",
        help="with --jwt-issuer: an audience (`aud`) a token must name; repeat for more",
    )
    parser.add_argument(
        "--jwt-jwks-file", type=Path, default=None, metavar="FILE", help="the issuer's JSON Web Key Set, a file"
    )
    parser.add_argument(
        "--jwt-jwks-uri",
        default=None,
        metavar="URI",
        help="the issuer's JSON Web Key Set, fetched by Envoy at start and again when its cache expires",
    )
    parser.add_argument(
        "--jwt-jwks-cache",
        type=int,
        default=DEFAULT_JWKS_CACHE_S,
        metavar="S",
        help="with --jwt-jwks-uri: seconds Envoy keeps the fetched keys (default %(default)s)",
    )
    parser.add_argument(
        "--jwt-jwks-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="with an https --jwt-jwks-uri: CA bundle its server's certificate must chain to "
        "(default: the system's, SSL_CERT_FILE or OpenSSL's default file)",
    )
    parser.add_argument(
        "--jwt-clock-skew",
        type=int,
        default=DEFAULT_CLOCK_SKEW_S,
        metavar="S",
        help="with --jwt-issuer: seconds a token's exp and nbf may be off (default %(default)s)",
    )


def edge_policy_from_args(args: argparse.Namespace) -> EdgePolicy:
    """EdgePolicy of the add_edge_arguments flags; ValueError names what is wrong."""
    if args.edge_rate_burst is not None and args.edge_rate_limit is None:
        raise ValueError("--edge-rate-burst needs --edge-rate-limit")
    if args.edge_caller_rate_burst is not None and args.edge_caller_rate_limit is None:
        raise ValueError("--edge-caller-rate-burst needs --edge-caller-rate-limit")
    keys = load_api_keys(args.api_key_file) if args.api_key_file is not None else ()
    shed_latency = args.edge_shed_latency or None  # 0: off
    return EdgePolicy(
        args.edge_rate_limit,
        args.edge_rate_burst,
        keys,
        admission_latency_ms=shed_latency,
        jwt=jwt_auth_from_args(args),
        auth=args.edge_auth,
        caller_rate_limit_rps=args.edge_caller_rate_limit,
        caller_rate_limit_burst=args.edge_caller_rate_burst,
    )


def jwt_auth_from_args(args: argparse.Namespace) -> JwtAuth | None:
    jwks_flags = (args.jwt_jwks_file, args.jwt_jwks_uri, args.jwt_jwks_ca, *args.jwt_audience)
    if args.jwt_issuer is None:
        if any(flag is not None for flag in jwks_flags):
            raise ValueError("the --jwt-* flags need --jwt-issuer")
        return None
    jwks_file = check_jwks_file(args.jwt_jwks_file) if args.jwt_jwks_file is not None else None
    ca_file = args.jwt_jwks_ca.resolve() if args.jwt_jwks_ca is not None else None
    if ca_file is None and (args.jwt_jwks_uri or "").startswith("https://"):
        ca_file = system_ca_bundle()
    return JwtAuth(
        args.jwt_issuer,
        tuple(args.jwt_audience),
        jwks_file=jwks_file,
        jwks_uri=args.jwt_jwks_uri,
        jwks_cache_s=args.jwt_jwks_cache,
        clock_skew_s=args.jwt_clock_skew,
        jwks_ca_file=ca_file,
    )


def build_parser(prog: str = "infermesh envoy") -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description="Render Envoy configs for the mesh.")
    commands = parser.add_subparsers(dest="command", required=True)
    rend = commands.add_parser("render", help="render a static Envoy bootstrap as JSON")
    rend.add_argument(
        "--replicas", default="", help="e.g. scoring=2,features=1 (default: scoring=2, one of each other service)"
    )
    rend.add_argument("--edge-port", type=port, default=DEFAULT_EDGE_PORT, help="REST + gRPC edge port")
    rend.add_argument("--admin-port", type=port, default=DEFAULT_ADMIN_PORT, help="Envoy admin port, on 127.0.0.1")
    rend.add_argument(
        "--descriptor-set",
        type=Path,
        default=INSTALLED_DESCRIPTOR_SET,
        help="proto descriptor set for the transcoder, with openapi.json beside it (a relative path is "
        "relative to Envoy's working directory) (default: the installed services/genproto's)",
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
