"""`infermesh drift`: tools for the scoring service's drift monitor.

infermesh drift baseline   a model's drift reference from your own feature data (Parquet/CSV)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infermesh.cli_help import group_parser, run_group

COMMANDS: dict[str, tuple[str, str]] = {
    "baseline": ("infermesh.drift.baseline", "build a model's drift reference from your own feature data"),
}


def build_parser() -> argparse.ArgumentParser:
    return group_parser("infermesh drift", (__doc__ or "").splitlines()[0], COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    return run_group(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
