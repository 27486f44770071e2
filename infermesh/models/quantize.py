"""`infermesh models quantize`: an int8 copy of a model (ONNX Runtime quantization) added
to the repository as a new version, with a report against the float model: file size,
CPU throughput at one batch size, and ranking quality (NDCG@20 over queries of 200 rows).

    infermesh models quantize --model ranker [--data FILE [--label COLUMN]] [--method static]
                              [--max-ndcg-drop 0.01] [--dry-run]

Any model: rows are generated for, or read from --data for, each of the model's named
inputs with that input's dtype and shape (infermesh/models/inputs.py). Without a --label
the gains are the float model's own scores, so the NDCG says how much of the float
model's ranking the int8 one keeps. --max-ndcg-drop refuses to publish a version that
loses more than that (exit 1): in poll mode a running server would pick it up and, under
the default "latest 1" policy, send traffic to it. --dry-run only reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infermesh.cli_help import CommandParser, number, whole_number
from infermesh.models.inputs import (
    FeatureDataError,
    InputSpec,
    generate_rows,
    input_specs,
    parse_column_map,
    read_rows,
    read_table,
)
from infermesh.models.names import model_name, model_version
from infermesh.settings import model_repository
from infermesh.workload import modelgen
from infermesh.workload.catalog import DEFAULT_SEED, ndcg_at_k
from services.scoring.config import MODEL_FILE, read_provenance
from services.scoring.discovery import versions_on_disk
from services.scoring.loading import session_options

K = 20
# Generated rows: the pool queries draw their candidates from.
GENERATED_ROWS = 10_000
CALIBRATION_ROWS = 2_000
_CALIBRATION_BATCH = 64
_SCORING_BATCH = 1_024
# Beside every version quantize writes: what it came from and how it measured.
QUANTIZED_FILE = "quantized.json"
METHODS = {
    "dynamic": "onnxruntime dynamic int8 (QInt8 weights)",
    "static": "onnxruntime static int8 (QDQ, calibrated activations)",
}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Measurement:
    bytes: int
    items_per_s: float
    ndcg_at_20: float


@dataclass(frozen=True)
class Evaluation:
    """Rows per input, the queries over them (row indices), and the gains, if labelled."""

    rows: Feed
    queries: np.ndarray  # int [queries, candidates]
    labels: np.ndarray | None  # float [rows]; None: the float model's scores are the gains
    source: str


def quantize_bytes(model: bytes, method: str = "dynamic", calibration: Feed | None = None) -> bytes:
    from onnxruntime import quantization as q  # heavy import, only here

    with tempfile.TemporaryDirectory() as workdir:
        source, target = Path(workdir) / "float.onnx", Path(workdir) / "int8.onnx"
        source.write_bytes(model)
        # It advises shape-inference pre-processing on the root logger; an MLP gains nothing.
        logging.disable(logging.WARNING)
        try:
            if method == "static":
                assert calibration is not None, "static quantization needs calibration rows"
                reader = _CalibrationReader(calibration)
                q.quantize_static(str(source), str(target), reader, quant_format=q.QuantFormat.QDQ)
            else:
                q.quantize_dynamic(str(source), str(target), weight_type=q.QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over rows per input, in small batches."""

    def __init__(self, rows: Feed) -> None:
        self._batches = _batches(rows, _CALIBRATION_BATCH)

    def get_next(self) -> Feed | None:
        return next(self._batches, None)


def _batches(rows: Feed, size: int) -> Iterator[Feed]:
    count = len(next(iter(rows.values())))
    for start in range(0, count, size):
        yield {name: values[start : start + size] for name, values in rows.items()}


def _session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])


def scores(model: bytes, rows: Feed) -> np.ndarray:
    """float64 [rows]: the first output's first column for every row."""
    session = _session(model)
    parts = [np.asarray(session.run(None, batch)[0]) for batch in _batches(rows, _SCORING_BATCH)]
    return np.concatenate([p.reshape(len(p), -1)[:, 0] for p in parts]).astype(np.float64)


def throughput(model: bytes, rows: Feed, batch: int, seconds: float, threads: int = 1) -> float:
    session = _session(model, threads)
    feed = next(_batches(rows, batch))
    batch = len(next(iter(feed.values())))
    for _ in range(10):
        session.run(None, feed)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, feed)
        calls += 1
    return calls * batch / elapsed


def query_gains(values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """[queries, candidates] gains in [0, 1]: each query's values scaled min to max."""
    gains = values[queries]
    low = gains.min(axis=1, keepdims=True)
    span = gains.max(axis=1, keepdims=True) - low
    return np.divide(gains - low, span, out=np.zeros_like(gains), where=span > 0)


def ranking_quality(predicted: np.ndarray, gains: np.ndarray, queries: np.ndarray) -> float:
    """Mean NDCG@20 of the queries ranked by `predicted` [rows] with `gains` [queries, candidates]."""
    return ndcg_at_k(predicted[queries], gains, K)


def measure(model: bytes, evaluation: Evaluation, gains: np.ndarray, seconds: float) -> Measurement:
    quality = ranking_quality(scores(model, evaluation.rows), gains, evaluation.queries)
    return Measurement(len(model), throughput(model, evaluation.rows, 256, seconds), quality)


def make_queries(rows: int, queries: int, candidates: int, seed: int) -> np.ndarray:
    """`queries` draws of `candidates` distinct rows each."""
    if rows < candidates:
        raise FeatureDataError(f"{rows} rows cannot make a query of {candidates} candidates; lower --candidates")
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(rows, size=candidates, replace=False) for _ in range(queries)])


def evaluation_rows(
    args: argparse.Namespace, specs: Sequence[InputSpec], columns: Mapping[str, list[str]]
) -> Evaluation:
    """--data's rows (and --label's gains), or rows generated for each input."""
    if args.data is None:
        rows = generate_rows(specs, GENERATED_ROWS, np.random.default_rng(DEFAULT_SEED))
        queries = make_queries(GENERATED_ROWS, args.queries, args.candidates, DEFAULT_SEED + 1)
        return Evaluation(rows, queries, None, "generated from the model's inputs")
    read = read_rows(args.data, specs, columns)
    labels = None
    if args.label:
        labels = read_label(args.data, args.label)
    queries = make_queries(read.rows, args.queries, args.candidates, DEFAULT_SEED + 1)
    return Evaluation(read.inputs, queries, labels, str(args.data))


def read_label(path: Path, column: str) -> np.ndarray:
    table = read_table(path)
    if column not in table.column_names:
        raise FeatureDataError(f"{path}: no label column {column[:60]!r}")
    values = table.column(column).to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "iufb":
        raise FeatureDataError(f"{path}: label column {column!r} is {table.column(column).type}; needs numbers")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise FeatureDataError(f"{path}: label column {column!r} has empty or non-finite values")
    return values


def calibration_rows(
    args: argparse.Namespace, specs: Sequence[InputSpec], columns: Mapping[str, list[str]], evaluation: Evaluation
) -> Feed:
    """--calibration's rows, else the first CALIBRATION_ROWS evaluation rows."""
    if args.calibration is not None:
        return read_rows(args.calibration, specs, columns, limit=CALIBRATION_ROWS).inputs
    return {name: values[:CALIBRATION_ROWS] for name, values in evaluation.rows.items()}


def newest_version(directory: Path, prog: str = "infermesh models quantize", *, float_only: bool = False) -> int:
    """The newest <version>/model.onnx of a model directory (as the repository finds them);
    `float_only`: the newest not made by quantize (no quantized.json), what it quantizes."""
    versions = sorted(versions_on_disk(directory))
    if not versions:
        raise SystemExit(f"{prog}: no <version>/{MODEL_FILE} under {directory}")
    if float_only:
        versions = [v for v in versions if not (directory / str(v) / QUANTIZED_FILE).is_file()]
        if not versions:
            raise SystemExit(f"{prog}: every version under {directory} is already int8")
    return versions[-1]


def add_model_arguments(p: argparse.ArgumentParser, model_help: str, version_help: str) -> None:
    """--repository, --model and --version: which model version of which repository."""
    p.add_argument(
        "--repository",
        type=Path,
        default=Path(model_repository()),
        help="the model repository (default $SCORING_MODEL_REPOSITORY or .infermesh/models)",
    )
    p.add_argument("--model", default="ranker", type=model_name, help=model_help)
    p.add_argument("--version", type=model_version, help=version_help)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh models quantize", description=__doc__.split("\n\n")[0])
    add_model_arguments(p, "the model to quantize", "float version to quantize (default: the newest)")
    p.add_argument("--method", choices=sorted(METHODS), default="dynamic", help="how to quantize")
    p.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="evaluation rows, Parquet or CSV, columns per model input as `infermesh features ingest` reads "
        "them (INPUT, or INPUT_0..INPUT_{n-1}) (default: rows generated from each input's dtype and shape)",
    )
    p.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="INPUT=COL,...",
        help="the file columns of one model input, in order (repeat per input)",
    )
    p.add_argument(
        "--label",
        metavar="COLUMN",
        help="--data's relevance column, the NDCG gains (default: the float model's own scores)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help=f"--method static: calibration rows, same columns as --data (default: the first "
        f"{CALIBRATION_ROWS:,} evaluation rows)",
    )
    p.add_argument("--queries", type=whole_number(1), default=300, help="queries for NDCG@20 (default %(default)s)")
    p.add_argument(
        "--candidates", type=whole_number(K), default=200, help="rows ranked per query (default %(default)s)"
    )
    p.add_argument("--seconds", type=number(above=0), default=2.0, help="timing per model at batch 256")
    p.add_argument(
        "--max-ndcg-drop", type=number(at_least=0), default=0.01, help="refuse to publish beyond this NDCG@20 loss"
    )
    p.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _fail(message: str) -> int:
    print(f"infermesh models quantize: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.label and args.data is None:
        parser.error("--label names a column of --data; give --data too")
    if args.calibration is not None and args.method != "static":
        parser.error("--calibration calibrates --method static; dynamic quantization takes none")
    directory = args.repository / args.model
    if not directory.is_dir():
        return _fail(f"no model {args.model!r} in {args.repository}")
    source_version = args.version or newest_version(directory, float_only=True)
    source = directory / str(source_version) / MODEL_FILE
    if not source.is_file():
        return _fail(f"{source} does not exist")
    if (source.parent / QUANTIZED_FILE).is_file():
        return _fail(f"{args.model} v{source_version} is already int8 ({QUANTIZED_FILE}); give a float --version")
    float_model = source.read_bytes()
    try:
        specs = input_specs(float_model)
        columns = parse_column_map(args.columns)
        evaluation = evaluation_rows(args, specs, columns)
        calibration = calibration_rows(args, specs, columns, evaluation) if args.method == "static" else None
    except FeatureDataError as error:
        return _fail(str(error))
    try:
        int8_model = quantize_bytes(float_model, args.method, calibration)
    except Exception as error:  # onnxruntime.quantization raises what it meets, e.g. for ai.onnx.ml ops
        return _fail(f"ONNX Runtime's quantizer cannot quantize {source}: {error}")
    reference = evaluation.labels if evaluation.labels is not None else scores(float_model, evaluation.rows)
    gains = query_gains(reference, evaluation.queries)
    before = measure(float_model, evaluation, gains, args.seconds)
    after = measure(int8_model, evaluation, gains, args.seconds)
    drop = before.ndcg_at_20 - after.ndcg_at_20
    accepted = drop <= args.max_ndcg_drop
    new_version = newest_version(directory) + 1
    written = None
    if accepted and not args.dry_run:
        written = publish(args, source, int8_model, new_version, before, after)
    report = {
        "model": args.model,
        "from_version": source_version,
        "new_version": new_version if written else None,
        "method": args.method,
        "inputs": {spec.name: f"{spec.dtype.name} x {spec.width}" for spec in specs},
        "rows": evaluation.source,
        "gains": f"label {args.label!r}" if evaluation.labels is not None else "the float model's scores",
        "float": asdict(before),
        "int8": asdict(after),
        "ndcg_drop": drop,
        "max_ndcg_drop": args.max_ndcg_drop,
        "accepted": accepted,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, before, after, written)
    if not accepted:
        return _fail(
            f"NOT published: NDCG@20 dropped by {drop:.5f} ({before.ndcg_at_20:.5f} -> {after.ndcg_at_20:.5f}), "
            f"beyond --max-ndcg-drop {args.max_ndcg_drop}"
        )
    return 0


def publish(
    args: argparse.Namespace, source: Path, int8_model: bytes, version: int, before: Measurement, after: Measurement
) -> Path:
    written = modelgen.write_version(args.repository, args.model, version, int8_model)
    source_version = int(source.parent.name)
    sidecar = {
        "quantized_from": source_version,
        "method": METHODS[args.method],
        "rows": str(args.data) if args.data else "generated",
        "float": asdict(before),
        "int8": asdict(after),
    }
    (written.parent / QUANTIZED_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    # The int8 version comes from the same data and code as its float source.
    inherited = read_provenance(source.parent, {})
    provenance = {**inherited, "quantized_from": str(source_version), "quantization": sidecar["method"]}
    modelgen.write_provenance(written.parent, provenance)
    return written


def print_report(report: dict, before: Measurement, after: Measurement, written: Path | None) -> None:
    drop = report["ndcg_drop"]
    print(f"{report['model']} v{report['from_version']} -> int8 ({report['method']} quantization)")
    print(f"  inputs     {', '.join(f'{name} {kind}' for name, kind in report['inputs'].items())}")
    print(f"  rows       {report['rows']}; gains: {report['gains']}")
    print(f"  size       {before.bytes:>10,} B -> {after.bytes:>10,} B  ({after.bytes / before.bytes:.0%})")
    print(
        f"  items/s    {before.items_per_s:>10,.0f}   -> {after.items_per_s:>10,.0f}    "
        f"({after.items_per_s / before.items_per_s:.2f}x, batch 256, 1 thread)"
    )
    print(
        f"  NDCG@20    {before.ndcg_at_20:>10.5f}   -> {after.ndcg_at_20:>10.5f}    "
        f"(drop {drop:+.5f}; limit {report['max_ndcg_drop']})"
    )
    if written:
        print(f"  published  {written} (version {report['new_version']})")
    elif report["accepted"]:
        print("  dry run: nothing written")
