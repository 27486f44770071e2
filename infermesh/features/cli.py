"""`infermesh features`: ingest files into feature views, list views, benchmark GetFeatures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from infermesh.cli_help import CommandParser, add_delegated, run_delegated, whole_number
from infermesh.settings import LOCAL_REDIS_URL, features_settings, tools_redis_url
from services.runtime.redis_keys import DEFAULT_NAMESPACE


def _ingest_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser(
        "ingest",
        help="load a CSV or Parquet file into a feature view (new materialization, switched atomically)",
        description="Load a CSV or Parquet file into a feature view. Bad rows are skipped and reported; "
        "a failed ingest leaves the previous materialization serving.",
    )
    p.add_argument("file", type=Path, help="a .csv or .parquet file")
    p.add_argument("--view", required=True, help="the feature view to load (see `infermesh features views`)")
    p.add_argument(
        "--registry",
        default=features_settings()[0] or None,
        help="views YAML (default $FEATURES_REGISTRY or the built-in reference registry)",
    )
    p.add_argument(
        "--redis-url",
        default=tools_redis_url(),
        help=f"the features' Redis (default $INFERMESH_REDIS_URL, $REDIS_URL or {LOCAL_REDIS_URL})",
    )
    p.add_argument(
        "--namespace",
        default=features_settings()[1],
        help=f"root key namespace (default $FEATURES_NAMESPACE or {DEFAULT_NAMESPACE})",
    )
    p.add_argument(
        "--batch-rows", type=whole_number(1), default=10_000, help="rows per pipeline round trip (default %(default)s)"
    )
    p.add_argument(
        "--max-bad-rows", type=whole_number(0), default=None, help="abort (nothing switched) past this many bad rows"
    )
    p.add_argument("--bad-rows-out", type=Path, help="write every bad row (place<TAB>reason) to this file")
    p.add_argument("--index", type=Path, help="also rebuild the candidate index here (retrieval item view only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_ingest(args: argparse.Namespace) -> int:
    import redis

    from infermesh.features.ingest import IngestError, format_report, ingest
    from infermesh.settings import tools_redis_target
    from services.features.registry import RegistryError, load_registry
    from services.runtime.redis_connection import redact_url
    from services.runtime.settings import SettingsError

    try:
        registry = load_registry(args.registry)
        target = tools_redis_target(args.redis_url)
        client = target.client(socket_connect_timeout=5, socket_timeout=60)
        client.ping()
    except (RegistryError, SettingsError) as error:
        print(f"infermesh features ingest: {error}", file=sys.stderr)
        return 2
    except redis.AuthenticationError as error:  # before ConnectionError, its base
        print(f"infermesh features ingest: {target.refused(error)}", file=sys.stderr)
        return 2
    except (redis.ConnectionError, redis.TimeoutError, ValueError) as error:
        print(
            f"infermesh features ingest: cannot reach Redis at {redact_url(args.redis_url)}: {error}", file=sys.stderr
        )
        return 1
    try:
        report = ingest(
            client,
            registry,
            args.view,
            args.file,
            namespace=args.namespace,
            batch_rows=args.batch_rows,
            progress=not args.no_progress,
            max_bad_rows=args.max_bad_rows,
            index_path=args.index,
        )
    except IngestError as error:
        print(f"infermesh features ingest: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.bad_rows_out:
        args.bad_rows_out.write_text("".join(f"{bad.where}\t{bad.reason}\n" for bad in report.bad_rows))
    print(format_report(report))
    return 0


def cmd_views(args: argparse.Namespace) -> int:
    from services.features.registry import REFERENCE_REGISTRY_YAML, RegistryError, load_registry

    try:
        registry = load_registry(args.registry)
    except RegistryError as error:
        print(f"infermesh features views: {error}", file=sys.stderr)
        return 2
    if args.yaml:
        print(Path(args.registry).read_text() if args.registry else REFERENCE_REGISTRY_YAML, end="")
        return 0
    for view in registry.views.values():
        ttl = f"ttl {view.ttl_seconds:g}s" if view.ttl_seconds else "no ttl"
        print(
            f"{view.name}: entity {view.entity} (id column {view.id_column}), {view.width} columns, "
            f"{view.record_dtype.itemsize} bytes/record, {ttl}"
        )
        for f in view.features:
            shape = f"[{f.length}]" if f.length > 1 else ""
            default = f.default[0] if len(set(f.default)) == 1 else list(f.default)
            print(
                f"  {f.name}: {f.dtype}{shape} default {default:g}"
                if isinstance(default, float)
                else f"  {f.name}: {f.dtype}{shape} default {default}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh features", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _ingest_parser(commands)
    views = commands.add_parser("views", help="list the registry's feature views")
    views.add_argument(
        "--registry",
        default=features_settings()[0] or None,
        help="views YAML (default $FEATURES_REGISTRY or the built-in reference registry)",
    )
    views.add_argument("--yaml", action="store_true", help="print the registry file itself (a starting point)")
    add_delegated(
        commands,
        "bench",
        "infermesh.bench.features",
        "GetFeatures latency/throughput (cache hot and cold) and retrieval",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    delegated = run_delegated(args, rest)
    if delegated is not None:
        return delegated
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd_ingest(args) if args.command == "ingest" else cmd_views(args)


if __name__ == "__main__":
    sys.exit(main())
