"""`infermesh models`: tools for the scoring model repository.

infermesh models bench     items/s through gRPC vs raw ONNX Runtime
infermesh models quantize  an int8 version of a model, with size/speed/NDCG@20 report
infermesh models import    a scikit-learn / LightGBM model as a new ONNX version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infermesh.cli_help import CommandParser, add_delegated, run_delegated

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("infermesh.bench.scoring", "scoring throughput through gRPC vs raw ONNX Runtime"),
    "quantize": ("infermesh.models.quantize", "add an int8 (dynamic quantization) version of a model"),
    "import": ("infermesh.models.importer", "convert a scikit-learn or LightGBM model to ONNX as a new version"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh models", description=(__doc__ or "").splitlines()[0])
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
