"""`infermesh models`: tools for the scoring model repository.

    infermesh models bench     items/s through gRPC vs raw ONNX Runtime
    infermesh models quantize  an int8 version of a model, with size/speed/NDCG@20 report
    infermesh models import    a scikit-learn / LightGBM model as a new ONNX version
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("infermesh.bench.scoring", "scoring throughput through gRPC vs raw ONNX Runtime"),
    "quantize": ("infermesh.models.quantize", "add an int8 (dynamic quantization) version of a model"),
    "import": ("infermesh.models.importer", "convert a scikit-learn or LightGBM model to ONNX as a new version"),
}


def usage() -> str:
    lines = ["usage: infermesh models {" + ",".join(COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"infermesh models: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
