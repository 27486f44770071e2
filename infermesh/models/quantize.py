"""`infermesh models quantize`: an int8 copy of a model (ONNX Runtime dynamic quantization)
added to the repository as a new version, with a report against the float model:
file size, CPU throughput at one batch size, and ranking quality (NDCG@20 against the
reference workload's ground-truth affinity, on users x 200 random candidates).

    infermesh models quantize --model ranker [--version 1] [--max-ndcg-drop 0.01] [--dry-run]

In poll mode a running server picks the new version up and, under the default
"latest 1" policy, sends traffic to it: --max-ndcg-drop refuses to publish a version
that loses more ranking quality than allowed, --dry-run only reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infermesh.cli_help import CommandParser
from infermesh.settings import model_repository
from infermesh.workload import modelgen
from infermesh.workload.catalog import DEFAULT_SEED, affinity, generate_catalog, model_input, ndcg_at_k
from services.scoring.config import MODEL_FILE, read_provenance
from services.scoring.loading import session_options

CANDIDATES = 200
K = 20


@dataclass(frozen=True)
class Measurement:
    bytes: int
    items_per_s: float
    ndcg_at_20: float


def quantize_bytes(model: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # heavy import, only here

    with tempfile.TemporaryDirectory() as workdir:
        source, target = Path(workdir) / "float.onnx", Path(workdir) / "int8.onnx"
        source.write_bytes(model)
        # It advises shape-inference pre-processing on the root logger; an MLP gains nothing.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


def throughput(model: bytes, batch: int, seconds: float, threads: int = 1) -> float:
    session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).standard_normal((batch, 64)).astype(np.float32)}
    for _ in range(10):
        session.run(None, feed)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        session.run(None, feed)
        calls += 1
    return calls * batch / elapsed


def ranking_quality(model: bytes, users: int, seed: int = DEFAULT_SEED) -> float:
    """Mean NDCG@20 over `users` queries of 200 random candidates, gains = true affinity."""
    catalog = generate_catalog(seed)
    rng = np.random.default_rng(seed + 1)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    user_ids = rng.choice(catalog.n_users, size=users, replace=False)
    predicted = np.empty((users, CANDIDATES), np.float32)
    gains = np.empty((users, CANDIDATES), np.float32)
    for row, user in enumerate(user_ids):
        items = rng.choice(catalog.n_items, size=CANDIDATES, replace=False)
        predicted[row] = session.run(None, {name: model_input(catalog.user_vecs[user], catalog.item_vecs[items])})[0][
            :, 0
        ]
        gains[row] = affinity(catalog.user_vecs[user][None, :], catalog.item_vecs[items])
    return ndcg_at_k(predicted, gains, K)


def measure(model: bytes, users: int, seconds: float) -> Measurement:
    return Measurement(len(model), throughput(model, 256, seconds), ranking_quality(model, users))


def newest_version(directory: Path) -> int:
    versions = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file()]
    if not versions:
        raise SystemExit(f"infermesh models quantize: no <version>/{MODEL_FILE} under {directory}")
    return max(versions)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh models quantize", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repository",
        type=Path,
        default=Path(model_repository()),
        help="the model repository (default $SCORING_MODEL_REPOSITORY or .infermesh/models)",
    )
    p.add_argument("--model", default="ranker", help="the model to quantize")
    p.add_argument("--version", type=int, help="float version to quantize (default: the newest)")
    p.add_argument("--users", type=int, default=300, help="queries for NDCG@20 (default %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per model at batch 256")
    p.add_argument("--max-ndcg-drop", type=float, default=0.01, help="refuse to publish beyond this NDCG@20 loss")
    p.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory = args.repository / args.model
    if not directory.is_dir():
        print(f"infermesh models quantize: no model {args.model!r} in {args.repository}", file=sys.stderr)
        return 1
    source_version = args.version or newest_version(directory)
    source = directory / str(source_version) / MODEL_FILE
    if not source.is_file():
        print(f"infermesh models quantize: {source} does not exist", file=sys.stderr)
        return 1
    float_model = source.read_bytes()
    int8_model = quantize_bytes(float_model)
    before, after = measure(float_model, args.users, args.seconds), measure(int8_model, args.users, args.seconds)
    drop = before.ndcg_at_20 - after.ndcg_at_20
    accepted = drop <= args.max_ndcg_drop
    new_version = newest_version(directory) + 1
    written = None
    if accepted and not args.dry_run:
        written = modelgen.write_version(args.repository, args.model, new_version, int8_model)
        sidecar = {
            "quantized_from": source_version,
            "method": "onnxruntime dynamic int8 (QInt8 weights)",
            "float": asdict(before),
            "int8": asdict(after),
        }
        (written.parent / "quantized.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        # The int8 version comes from the same data and code as its float source.
        inherited = read_provenance(source.parent, {})
        provenance = {**inherited, "quantized_from": str(source_version), "quantization": sidecar["method"]}
        modelgen.write_provenance(written.parent, provenance)
    report = {
        "model": args.model,
        "from_version": source_version,
        "new_version": new_version if written else None,
        "float": asdict(before),
        "int8": asdict(after),
        "ndcg_drop": drop,
        "accepted": accepted,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.model} v{source_version} -> int8 (dynamic quantization)")
        print(f"  size       {before.bytes:>10,} B -> {after.bytes:>10,} B  ({after.bytes / before.bytes:.0%})")
        print(
            f"  items/s    {before.items_per_s:>10,.0f}   -> {after.items_per_s:>10,.0f}    "
            f"({after.items_per_s / before.items_per_s:.2f}x, batch 256, 1 thread)"
        )
        print(
            f"  NDCG@20    {before.ndcg_at_20:>10.5f}   -> {after.ndcg_at_20:>10.5f}    "
            f"(drop {drop:+.5f}; limit {args.max_ndcg_drop})"
        )
        if written:
            print(f"  published  {written} (version {new_version})")
        elif not accepted:
            print("  NOT published: ranking quality dropped beyond --max-ndcg-drop")
        else:
            print("  dry run: nothing written")
    return 0 if accepted else 1
