"""`infermesh drift baseline`: a model version's drift reference (drift_reference.json beside
its model.onnx) built from your own feature data rather than the demo catalog.

    infermesh drift baseline --model ranker --data features.parquet [--columns dense=age,price]

The file (Parquet or CSV) holds rows of the model's inputs, columns by name as `infermesh
models quantize --data` reads them: per model input `x` of width n, a column `x` (a scalar,
or in Parquet a list of n), columns `x_0` .. `x_{n-1}`, or the columns --columns names.
The model scores the rows for the prediction histogram. A serving scoring replica loads the
reference with the version (a running one on its next load of that version).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infermesh.cli_help import CommandParser, whole_number
from infermesh.models.inputs import FeatureDataError, input_specs, parse_column_map, read_rows
from infermesh.models.quantize import add_model_arguments, newest_version
from services.scoring.config import MODEL_FILE
from services.scoring.drift import DEFAULT_BINS, DEFAULT_REFERENCE_ROWS, DriftReference, write_drift_reference

SAMPLE_SEED = 0


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh drift baseline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="the feature rows, a Parquet (.parquet, .pq) or CSV file",
    )
    add_model_arguments(p, "the model the reference is for", "its version (default: the newest)")
    p.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="INPUT=COL,...",
        help="the file columns of one model input, in order (repeat per input)",
    )
    p.add_argument(
        "--rows",
        type=whole_number(0),
        default=DEFAULT_REFERENCE_ROWS,
        help="a random sample of this many rows; 0: all of them",
    )
    p.add_argument("--bins", type=whole_number(2), default=DEFAULT_BINS, help="equal-mass bins per feature")
    return p


def _fail(message: str) -> int:
    print(f"infermesh drift baseline: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory = args.repository / args.model
    if not directory.is_dir():
        return _fail(f"no model {args.model!r} in {args.repository}")
    model_file = directory / str(args.version or newest_version(directory, "infermesh drift baseline")) / MODEL_FILE
    if not model_file.is_file():
        return _fail(f"{model_file} does not exist")
    try:
        specs = input_specs(model_file.read_bytes())
        read = read_rows(args.data, specs, parse_column_map(args.columns))
        if read.rows < args.bins:
            raise FeatureDataError(f"{args.data}: {read.rows} rows; {args.bins} bins need at least {args.bins}")
    except FeatureDataError as error:
        return _fail(str(error))
    inputs = read.inputs
    if 0 < args.rows < read.rows:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(read.rows, size=args.rows, replace=False))
        inputs = {name: values[keep] for name, values in inputs.items()}
    names = [column for spec in specs for column in read.columns[spec.name]]
    path = write_drift_reference(model_file, inputs, names, bins=args.bins, source=args.data.name)
    reference = DriftReference.load(path)
    print(f"wrote {path}")
    print(f"  rows       {reference.rows:,} of {read.rows:,} in {args.data}")
    for spec in specs:
        shown = ", ".join(read.columns[spec.name][:6]) + (", ..." if spec.width > 6 else "")
        print(f"  {spec.name:<10} {spec.dtype.name} x {spec.width} <- {shown}")
    print(f"  bins       {reference.bins} per feature and for the predictions")
    return 0
