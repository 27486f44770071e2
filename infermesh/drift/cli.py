"""`infermesh drift`: tools for the scoring service's drift monitor.

infermesh drift baseline   a model's drift reference from your own feature data (Parquet/CSV)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infermesh.cli_help import CommandParser, add_delegated, run_delegated

COMMANDS: dict[str, tuple[str, str]] = {
    "baseline": ("infermesh.drift.baseline", "build a model's drift reference from your own feature data"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh drift", description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary) in COMMANDS.items():
        add_delegated(commands, name, module, summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    delegated = run_delegated(args, rest)
    assert delegated is not None  # every subcommand is delegated
    return delegated


if __name__ == "__main__":
    sys.exit(main())
