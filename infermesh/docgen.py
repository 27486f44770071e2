"""The command line every generated document shares (docs/cli.md, docs/settings.md):
write it, or with --check only say whether the committed one is up to date."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def generated_doc_main(
    prog: str, description: str, default_out: Path, render: Callable[[], str], argv: list[str] | None = None
) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=default_out, help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only report whether --out is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale: run `{prog}`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0
