"""`infermesh models`: tools for the scoring model repository.

infermesh models bench     items/s through gRPC vs raw ONNX Runtime
infermesh models quantize  an int8 version of a model, with size/speed/NDCG@20 report
infermesh models import    a scikit-learn / LightGBM model as a new ONNX version
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infermesh.cli_help import group_parser, run_group

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("infermesh.bench.scoring", "scoring throughput through gRPC vs raw ONNX Runtime"),
    "quantize": (
        "infermesh.models.quantize",
        "add an int8 version of a model (dynamic or static quantization), gated on NDCG@20",
    ),
    "import": ("infermesh.models.importer", "convert a scikit-learn or LightGBM model to ONNX as a new version"),
}


def build_parser() -> argparse.ArgumentParser:
    return group_parser("infermesh models", (__doc__ or "").splitlines()[0], COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    return run_group(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
