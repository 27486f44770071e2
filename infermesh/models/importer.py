"""`infermesh models import`: a scikit-learn or LightGBM model file converted to ONNX with the
field's converters (skl2onnx, onnxmltools), checked for output parity with the original on
sample rows, and added to the repository as a new version.

    infermesh models import model.joblib --model churn [--sample rows.npy] [--tolerance 1e-4]
    infermesh models import booster.txt --model ranker_gbm

Accepted files: a pickled/joblib scikit-learn estimator or pipeline, or a LightGBM model
(text file from Booster.save_model, or a pickled LGBMRegressor/LGBMClassifier/Booster).
Pickles run code when loaded: import only files you trust.
The converters are the `import` extra: pip install -e '.[import]'.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from infermesh.cli_help import CommandParser
from infermesh.models.names import model_name
from infermesh.settings import model_repository
from infermesh.workload import modelgen
from services.scoring.config import CONFIG_FILE, MODEL_FILE, PBTXT_FILE, ConfigError
from services.scoring.discovery import read_model_config

INPUT = "features"
OPSETS = {"": 17, "ai.onnx.ml": 3}
LIGHTGBM_OPSET = 15  # the newest onnxmltools' LightGBM converter emits
DEFAULT_MAX_BATCH_SIZE = 4096


class ImportFailed(Exception):
    """The file cannot be read or converted, or the converted model disagrees with it."""


@dataclass(frozen=True)
class Converted:
    onnx: bytes
    converter: str
    native: np.ndarray  # the original model's predictions on the sample rows


def load_model(path: Path) -> Any:
    if path.suffix == ".txt":
        import lightgbm

        return lightgbm.Booster(model_file=str(path))
    try:
        import joblib

        return joblib.load(path)
    except Exception:
        with path.open("rb") as handle:
            try:
                return pickle.load(handle)
            except Exception as error:
                raise ImportFailed(f"{path}: not a joblib/pickle model or a LightGBM text model ({error})") from None


def n_features(model: Any) -> int:
    if hasattr(model, "num_feature"):  # lightgbm.Booster
        return int(model.num_feature())
    count = getattr(model, "n_features_in_", None)
    if count is None:
        raise ImportFailed(f"{type(model).__name__} does not say how many features it takes (n_features_in_)")
    return int(count)


def _is_lightgbm(model: Any) -> bool:
    return type(model).__module__.split(".")[0] == "lightgbm"


def _is_classifier(model: Any) -> bool:
    return hasattr(model, "predict_proba")


def convert(model: Any, rows: np.ndarray) -> Converted:
    """ONNX bytes plus the original model's predictions on `rows`, for the parity check."""
    features = rows.shape[1]
    if _is_lightgbm(model):
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType as MlFloat

        onnx_model = onnxmltools.convert_lightgbm(
            model, initial_types=[(INPUT, MlFloat([None, features]))], target_opset=LIGHTGBM_OPSET, zipmap=False
        )
        converter = f"onnxmltools {metadata.version('onnxmltools')}"
    else:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType

        options = {id(model): {"zipmap": False}} if _is_classifier(model) else None
        onnx_model = convert_sklearn(
            model, initial_types=[(INPUT, FloatTensorType([None, features]))], target_opset=OPSETS, options=options
        )
        converter = f"skl2onnx {metadata.version('skl2onnx')}"
    native = model.predict_proba(rows) if _is_classifier(model) else model.predict(rows)
    return Converted(onnx_model.SerializeToString(), converter, np.asarray(native))


def parity(converted: Converted, rows: np.ndarray) -> tuple[float, str]:
    """Largest absolute difference between ONNX Runtime and the original, and the output compared."""
    session = ort.InferenceSession(converted.onnx, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    # Classifiers (and binary LightGBM boosters) are compared on probabilities, regressors on values.
    output = "probabilities" if "probabilities" in names else names[0]
    served = session.run([output], {INPUT: rows})[0].astype(np.float64)
    native = converted.native.astype(np.float64)
    if native.ndim == 1 and served.ndim == 2 and served.shape == (len(native), 2):
        served = served[:, 1]  # a booster's predict() is the positive class's probability
    elif native.size == served.size:
        native = native.reshape(served.shape)
    else:
        raise ImportFailed(f"output {output!r} has shape {served.shape}; the original predicts {native.shape}")
    return float(np.max(np.abs(served - native))), output


def sample_rows(path: Path | None, features: int, count: int) -> np.ndarray:
    if path is not None:
        rows = np.load(path).astype(np.float32)
        if rows.ndim != 2 or rows.shape[1] != features:
            raise ImportFailed(f"{path}: sample rows must be [N, {features}], got {list(rows.shape)}")
        return rows
    return np.random.default_rng(0).standard_normal((count, features)).astype(np.float32)


def batch_major(onnx_model: bytes, rows: np.ndarray) -> tuple[bytes, bool]:
    """Declare the batch dimension where a converter fixed it wrongly (LightGBM's label says
    [1] but holds one value per row), and say whether every output is then batch-major."""
    import onnx

    model = onnx.load_from_string(onnx_model)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the very shape mismatch fixed here would be logged
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    produced = dict(zip((o.name for o in session.get_outputs()), session.run(None, {INPUT: rows}), strict=True))
    batched = True
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        actual = produced[output.name].shape
        if not dims or not actual or actual[0] != len(rows):
            batched = False
        elif not dims[0].dim_param:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    return model.SerializeToString(), batched


def check_signature(directory: Path, onnx_model: bytes) -> None:
    """An existing model's config that names its inputs or outputs must name this model's:
    a version that does not fit them would break every caller of the model once served."""
    if not directory.is_dir():
        return
    try:
        config, _ = read_model_config(directory, None)
    except ConfigError as error:
        raise ImportFailed(f"model {directory.name!r} exists and its config cannot be read: {error}") from None
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    for kind, declared, actual in (
        ("inputs", config.inputs, session.get_inputs()),
        ("outputs", config.outputs, session.get_outputs()),
    ):
        names, ours = sorted(t.name for t in declared), sorted(t.name for t in actual)
        if declared and names != ours:
            raise ImportFailed(
                f"model {directory.name!r} exists with {kind} {names}, this model has {ours}: "
                "import it under another --model name"
            )


def publish(
    repository: Path, name: str, onnx_model: bytes, batched: bool, provenance: dict[str, Any]
) -> tuple[int, Path]:
    directory = repository / name
    existing = [int(p.name) for p in directory.glob("*") if p.name.isdigit() and (p / MODEL_FILE).is_file()]
    version = max(existing, default=0) + 1
    # Never beside a Triton config.pbtxt: a config.json would take precedence over it.
    if not (directory / CONFIG_FILE).is_file() and not (directory / PBTXT_FILE).is_file():
        # Batching needs every output to be batch-major; otherwise each request runs alone.
        modelgen.write_config(repository, name, {"max_batch_size": DEFAULT_MAX_BATCH_SIZE if batched else 0})
    path = modelgen.write_version(repository, name, version, onnx_model)
    modelgen.write_provenance(path.parent, provenance)
    return version, path


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh models import", description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path, help="scikit-learn joblib/pickle, or LightGBM model (.txt or pickle)")
    p.add_argument("--model", required=True, type=model_name, help="model name in the repository")
    p.add_argument(
        "--repository",
        type=Path,
        default=Path(model_repository()),
        help="the model repository (default $SCORING_MODEL_REPOSITORY or .infermesh/models)",
    )
    p.add_argument(
        "--sample", type=Path, help=".npy float rows for the parity check (default: 512 standard normal rows)"
    )
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest allowed |onnx - original| (default %(default)s)"
    )
    p.add_argument("--dry-run", action="store_true", help="convert and check; write nothing")
    p.add_argument("--owner", help="provenance: who owns the model (team or person)")
    p.add_argument("--training-data-digest", help="provenance: digest of the data it was trained on")
    p.add_argument("--source-revision", help="provenance: revision of the code that trained it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.file)
        rows = sample_rows(args.sample, n_features(model), 512)
        try:
            converted = convert(model, rows)
        except ImportError:
            raise
        except Exception as error:  # converters raise all kinds; the message is what matters
            raise ImportFailed(f"cannot convert {type(model).__name__}: {error}") from None
        worst, output = parity(converted, rows)
    except ImportError as error:
        print(f"infermesh models import: {error}; install the converters: pip install -e '.[import]'", file=sys.stderr)
        return 1
    except ImportFailed as error:
        print(f"infermesh models import: {error}", file=sys.stderr)
        return 1
    print(f"{args.file} ({type(model).__name__}) -> ONNX with {converted.converter}")
    print(
        f"  parity on {len(rows)} rows, output {output!r}: "
        f"max |onnx - original| = {worst:.3g} (tolerance {args.tolerance})"
    )
    if worst > args.tolerance:
        print("  NOT imported: outputs differ beyond the tolerance", file=sys.stderr)
        return 1
    if args.dry_run:
        print("  dry run: nothing written")
        return 0
    given = {
        "owner": args.owner,
        "training_data_digest": args.training_data_digest,
        "source_revision": args.source_revision,
    }
    provenance = {
        **{key: value for key, value in given.items() if value},
        "source_file": str(args.file),
        "source_sha256": hashlib.sha256(args.file.read_bytes()).hexdigest(),
        "source_type": f"{type(model).__module__}.{type(model).__name__}",
        "converter": converted.converter,
        "parity": {"rows": len(rows), "output": output, "max_abs_diff": worst, "tolerance": args.tolerance},
    }
    onnx_model, batched = batch_major(converted.onnx, rows[:2] if len(rows) >= 2 else rows)
    try:
        check_signature(args.repository / args.model, onnx_model)
    except ImportFailed as error:
        print(f"infermesh models import: {error}", file=sys.stderr)
        return 1
    version, path = publish(args.repository, args.model, onnx_model, batched, provenance)
    print(f"  published  {path} (version {version})")
    return 0
