"""Model monitoring: input drift (PSI per feature) and prediction drift on a sliding window,
against a reference histogram saved beside the model.

* `write_drift_reference(model_file, inputs, feature_names)` writes
  `<model dir>/<version>/drift_reference.json` from rows of the model's named inputs:
  per-feature decile cut points and the share of reference rows in each bin, the same for
  the model's predictions, which model input each feature comes from, and the model's
  sha256. `infermesh drift baseline` calls it with the user's own feature file;
  `ensure_drift_reference(model_file, catalog)` with the demo catalog when seeding (a stale
  reference is rewritten).
* `DriftMonitor` (one per loaded model version) takes batches of model inputs and
  predictions, keeps bin counts of the last `window_rows` rows, and every
  `evaluate_every_rows` rows computes the population stability index
  PSI = sum((actual - expected) * ln(actual / expected)) per feature and for the
  predictions. It exports them as Prometheus gauges and logs `drift threshold exceeded`
  (warning) when a PSI crosses `threshold`, `drift back under threshold` when it recovers.

Rule of thumb for PSI: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 major; default threshold 0.2.
Only histograms are kept: no feature value is ever logged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

REFERENCE_NAME = "drift_reference.json"
REFERENCE_FORMAT = 1
DEFAULT_BINS = 10
DEFAULT_REFERENCE_ROWS = 20_000
DEFAULT_THRESHOLD = 0.2
# Empty bins would make PSI infinite; this floor is the usual smoothing.
_EPSILON = 1e-4


class CatalogLike(Protocol):
    """What the reference sampler needs from infermesh.workload.catalog.Catalog."""

    seed: int
    user_vecs: np.ndarray
    item_vecs: np.ndarray


# --------------------------------------------------------------------------- maths


def quantile_cuts(values: np.ndarray, bins: int) -> np.ndarray:
    """[columns, bins-1] inner cut points at the reference's quantiles (equal-mass bins)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.quantile(values, qs, axis=0).T.copy()


class Binner:
    """Bins values [rows, columns] by per-column cut points [columns, bins-1] with one
    searchsorted for all columns: each column is mapped monotonically into a band of its
    own (scaled by its cut range, clipped), so the flattened cuts stay sorted."""

    _BAND = 4.0

    def __init__(self, cuts: np.ndarray) -> None:
        cuts = np.asarray(cuts, dtype=np.float64)
        if cuts.ndim == 1:
            cuts = cuts[None, :]
        self.columns, self.inner = cuts.shape
        self.bins = self.inner + 1
        if self.inner:
            self._low = cuts.min(axis=1)
            self._scale = 1.0 / np.maximum(cuts.max(axis=1) - self._low, 1e-12)
            self._offset = np.arange(self.columns) * self._BAND + 1.0
            self._flat = ((cuts - self._low[:, None]) * self._scale[:, None] + self._offset[:, None]).ravel()
            self._first = np.arange(self.columns) * self.inner

    def counts(self, values: np.ndarray) -> np.ndarray:
        """[columns, bins] counts; bin b holds cuts[b-1] < v <= cuts[b]."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if not self.inner:
            return np.full((self.columns, 1), values.shape[0], dtype=np.int64)
        z = np.clip((values - self._low) * self._scale, -1.0, 2.0) + self._offset
        index = np.searchsorted(self._flat, z.ravel(), side="left").reshape(z.shape) - self._first
        flat = index + (np.arange(self.columns) * self.bins)[None, :]
        return np.bincount(flat.ravel(), minlength=self.columns * self.bins).reshape(self.columns, self.bins)


def bin_counts(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """[columns, bins] counts of `values` [rows, columns] in the bins `cuts` [columns, bins-1]
    define (bin b holds cuts[b-1] < v <= cuts[b]); vectorised, no per-row Python."""
    return Binner(cuts).counts(values)


def psi(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Population stability index per row of [.., bins] fractions (or counts, normalised here)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    e = e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-12)
    a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
    e = np.clip(e, _EPSILON, None)
    a = np.clip(a, _EPSILON, None)
    return ((a - e) * np.log(a / e)).sum(axis=-1)


# --------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class DriftReference:
    feature_names: tuple[str, ...]
    input_cuts: np.ndarray  # [features, bins-1]
    input_expected: np.ndarray  # [features, bins] fractions
    prediction_cuts: np.ndarray  # [1, bins-1]
    prediction_expected: np.ndarray  # [1, bins] fractions
    rows: int
    model_sha256: str = ""
    # (model input, values per row) in feature order: how the features map onto a model with
    # several named inputs. Empty: the features are the model's one input.
    inputs: tuple[tuple[str, int], ...] = ()
    source: str = ""  # what the reference rows were (a file name, the demo catalog)

    @property
    def bins(self) -> int:
        return int(self.input_expected.shape[1])

    @classmethod
    def build(
        cls,
        inputs: np.ndarray,
        predictions: np.ndarray,
        *,
        bins: int = DEFAULT_BINS,
        feature_names: Sequence[str] | None = None,
        model_sha256: str = "",
        model_inputs: Sequence[tuple[str, int]] = (),
        source: str = "",
    ) -> DriftReference:
        inputs = np.asarray(inputs, dtype=np.float32)
        predictions = np.asarray(predictions, dtype=np.float32).reshape(-1, 1)
        if inputs.ndim != 2 or inputs.shape[0] != predictions.shape[0] or inputs.shape[0] < bins:
            raise ValueError(
                f"need rows x features inputs and one prediction per row (>= {bins} rows); "
                f"got {inputs.shape} and {predictions.shape}"
            )
        names = tuple(feature_names) if feature_names else tuple(f"f{i}" for i in range(inputs.shape[1]))
        if len(names) != inputs.shape[1]:
            raise ValueError(f"{len(names)} feature names for {inputs.shape[1]} features")
        if model_inputs and sum(width for _, width in model_inputs) != inputs.shape[1]:
            raise ValueError(f"model inputs {list(model_inputs)} do not add up to {inputs.shape[1]} features")
        input_cuts = quantile_cuts(inputs, bins)
        prediction_cuts = quantile_cuts(predictions, bins)
        rows = inputs.shape[0]
        return cls(
            feature_names=names,
            input_cuts=input_cuts,
            input_expected=bin_counts(inputs, input_cuts) / rows,
            prediction_cuts=prediction_cuts,
            prediction_expected=bin_counts(predictions, prediction_cuts) / rows,
            rows=rows,
            model_sha256=model_sha256,
            inputs=tuple((name, int(width)) for name, width in model_inputs),
            source=source,
        )

    def to_json(self) -> dict[str, Any]:
        optional: dict[str, Any] = {"source": self.source} if self.source else {}
        if self.inputs:
            optional["model_inputs"] = [{"name": name, "width": width} for name, width in self.inputs]
        return {
            **optional,
            "format": REFERENCE_FORMAT,
            "model_sha256": self.model_sha256,
            "rows": self.rows,
            "bins": self.bins,
            "input": {
                "features": list(self.feature_names),
                "cuts": self.input_cuts.tolist(),
                "expected": self.input_expected.tolist(),
            },
            "prediction": {
                "cuts": self.prediction_cuts[0].tolist(),
                "expected": self.prediction_expected[0].tolist(),
            },
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DriftReference:
        if doc.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"unsupported drift reference format {doc.get('format')!r}")
        return cls(
            feature_names=tuple(doc["input"]["features"]),
            input_cuts=np.asarray(doc["input"]["cuts"], dtype=np.float64),
            input_expected=np.asarray(doc["input"]["expected"], dtype=np.float64),
            prediction_cuts=np.asarray([doc["prediction"]["cuts"]], dtype=np.float64),
            prediction_expected=np.asarray([doc["prediction"]["expected"]], dtype=np.float64),
            rows=int(doc["rows"]),
            model_sha256=str(doc.get("model_sha256", "")),
            inputs=tuple((str(i["name"]), int(i["width"])) for i in doc.get("model_inputs", ())),
            source=str(doc.get("source", "")),
        )

    def matches(self, model_inputs: Sequence[tuple[str, Sequence[int]]]) -> str:
        """Why this reference cannot monitor a model of these (input, row shape) pairs; "" if
        it can (a row shape with a -1 dim matches any width)."""
        widths = {name: math.prod(shape) if min(shape, default=0) >= 0 else -1 for name, shape in model_inputs}
        first = next(iter(widths), "")
        expected = self.inputs or (((first, len(self.feature_names)),) if len(widths) == 1 else ())
        if not expected:
            return f"the reference has no model_inputs; the model has {len(widths)} inputs"
        for name, width in expected:
            if name not in widths:
                return f"the reference's input {name!r} is not an input of the model"
            if 0 <= widths[name] != width:
                return f"the reference has {width} features for input {name!r}; the model takes {widths[name]}"
        if len(expected) != len(widths):
            return f"the reference covers {len(expected)} of the model's {len(widths)} inputs"
        return ""

    def feature_rows(self, inputs: np.ndarray | Mapping[str, np.ndarray], step: int = 1) -> np.ndarray:
        """[rows, features]: every `step`-th row, of the one input or of the named inputs
        side by side in the reference's feature order."""
        if not isinstance(inputs, Mapping):
            return np.asarray(inputs)[::step]
        if not self.inputs:
            (only,) = inputs.values()
            return np.asarray(only)[::step]
        parts = []
        for name, _ in self.inputs:
            values = np.asarray(inputs[name])[::step]
            parts.append(values.reshape(len(values), -1))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_json(), handle, indent=1, sort_keys=True)
                handle.write("\n")
            # mkstemp makes it 0600; readable like the model files beside it, for a scoring
            # process that runs as another user (the Kubernetes pods' UID 10001).
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def reference_path(model_file: Path) -> Path:
    """Where a model's reference lives: beside it (<repo>/<model>/<version>/drift_reference.json)."""
    return Path(model_file).parent / REFERENCE_NAME


def reference_feature_names(dim: int) -> tuple[str, ...]:
    """The ranker's input is [user vector, item vector]: user_0.., item_0.."""
    half = dim // 2
    return tuple(f"user_{i}" for i in range(half)) + tuple(f"item_{i}" for i in range(dim - half))


def sample_model_inputs(
    catalog: CatalogLike, rows: int = DEFAULT_REFERENCE_ROWS, seed: int | None = None
) -> np.ndarray:
    """Random (user, item) pairs as model rows: the distribution the ranker was trained on."""
    rng = np.random.Generator(np.random.PCG64(catalog.seed if seed is None else seed))
    users = catalog.user_vecs[rng.integers(0, len(catalog.user_vecs), rows)]
    items = catalog.item_vecs[rng.integers(0, len(catalog.item_vecs), rows)]
    return np.concatenate([users, items], axis=1).astype(np.float32, copy=False)


def _predict(model_file: Path, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """float32 [rows]: the model's first output (its first column) for every row."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    scores = np.asarray(session.run(None, dict(inputs))[0], dtype=np.float32)
    return scores.reshape(len(scores), -1)[:, 0]


def write_drift_reference(
    model_file: Path,
    inputs: Mapping[str, np.ndarray],
    feature_names: Sequence[str],
    *,
    bins: int = DEFAULT_BINS,
    source: str = "",
) -> Path:
    """The reference of `model_file` from rows of each of its named inputs (all of them, in
    the model's order; `feature_names` names their values in that order), beside the model.
    Predictions come from the model itself (ONNX Runtime, CPU)."""
    model_file = Path(model_file)
    layout = [(name, int(np.prod(np.shape(values)[1:]))) for name, values in inputs.items()]
    rows = [np.asarray(values).reshape(len(values), -1).astype(np.float32) for values in inputs.values()]
    reference = DriftReference.build(
        np.concatenate(rows, axis=1),
        _predict(model_file, inputs),
        bins=bins,
        feature_names=feature_names,
        model_sha256=hashlib.sha256(model_file.read_bytes()).hexdigest(),
        model_inputs=layout,
        source=source,
    )
    return reference.save(reference_path(model_file))


def ensure_drift_reference(
    model_file: Path, catalog: CatalogLike, *, rows: int = DEFAULT_REFERENCE_ROWS, bins: int = DEFAULT_BINS
) -> Path:
    """Write the demo model's drift reference unless an up-to-date one is there (say, one
    `infermesh drift baseline` built from other data); returns its path.

    Up to date: same model bytes (sha256) and bin count. Inputs are sampled like the
    training data.
    """
    model_file = Path(model_file)
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    path = reference_path(model_file)
    if path.is_file():
        try:
            existing = DriftReference.load(path)
            if existing.model_sha256 == digest and existing.bins == bins:
                return path
        except (OSError, ValueError, KeyError):
            pass  # unreadable: rewrite it
    inputs = sample_model_inputs(catalog, rows)
    return write_drift_reference(
        model_file,
        {_first_input_name(model_file): inputs},
        reference_feature_names(inputs.shape[1]),
        bins=bins,
        source="the demo catalog",
    )


def _first_input_name(model_file: Path) -> str:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    return next(value.name for value in graph.input if value.name not in initializers)


# --------------------------------------------------------------------------- monitor


@dataclass(frozen=True)
class DriftReport:
    rows: int  # rows in the window
    input_psi: np.ndarray  # [features]
    prediction_psi: float
    threshold: float
    feature_names: tuple[str, ...]

    @property
    def max_input_psi(self) -> float:
        return float(self.input_psi.max()) if self.input_psi.size else 0.0

    @property
    def drifted_features(self) -> list[str]:
        order = np.argsort(-self.input_psi)
        return [self.feature_names[i] for i in order if self.input_psi[i] > self.threshold]

    @property
    def input_drift(self) -> bool:
        return self.max_input_psi > self.threshold

    @property
    def prediction_drift(self) -> bool:
        return self.prediction_psi > self.threshold


@dataclass
class _Window:
    chunks: deque[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=deque)
    rows: int = 0
    inputs: np.ndarray | None = None
    predictions: np.ndarray | None = None


class DriftMonitor:
    """Sliding-window drift of one model version's inputs and predictions.

    `observe()` is cheap (at most `max_rows_per_batch` rows of each batch are binned, the
    rest skipped evenly; `sample_every` skips whole batches) and runs on the caller's thread; touch one monitor from one
    thread (the event loop) at a time.
    """

    def __init__(
        self,
        reference: DriftReference,
        *,
        metrics: Any | None = None,
        model: str = "",
        version: str = "",
        threshold: float = DEFAULT_THRESHOLD,
        window_rows: int = 10_000,
        min_rows: int = 1_000,
        evaluate_every_rows: int = 1_000,
        max_rows_per_batch: int = 32,
        sample_every: int = 1,
        logger: Any | None = None,
    ) -> None:
        self.reference = reference
        self.model = model
        self.version = version
        self.threshold = threshold
        self.window_rows = window_rows
        self.min_rows = min_rows
        self.evaluate_every_rows = evaluate_every_rows
        self.max_rows_per_batch = max_rows_per_batch
        self.sample_every = max(1, sample_every)
        self._calls = 0
        self._window = _Window()
        self._input_binner = Binner(reference.input_cuts)
        self._prediction_binner = Binner(reference.prediction_cuts)
        self._since_evaluation = 0
        self._alerting = {"input": False, "prediction": False}
        self.last_report: DriftReport | None = None
        if logger is None:
            from services.runtime.logs import get_logger

            logger = get_logger(__name__)
        self._log = logger
        self._instruments = _Instruments(metrics, model, version, reference.feature_names) if metrics else None

    @classmethod
    def for_model(
        cls, model_file: Path, model_inputs: Sequence[tuple[str, Sequence[int]]] = (), **kwargs: Any
    ) -> DriftMonitor | None:
        """A monitor from the reference beside `model_file`, or None when it has none, or
        (logged) one that does not fit the model's (input, row shape) pairs `model_inputs`."""
        path = reference_path(model_file)
        if not path.is_file():
            return None
        reference = DriftReference.load(path)
        mismatch = reference.matches(model_inputs) if model_inputs else ""
        if mismatch:
            from services.runtime.logs import get_logger

            get_logger(__name__).warning("drift reference ignored", path=str(path), reason=mismatch)
            return None
        return cls(reference, **kwargs)

    @property
    def rows(self) -> int:
        return self._window.rows

    def observe(self, inputs: np.ndarray | Mapping[str, np.ndarray], predictions: np.ndarray) -> DriftReport | None:
        """Add one batch (one input's [rows, features], or the model's named inputs); returns
        a report when this batch triggered an evaluation.

        Costs ~40 us for a 200-row batch of 64 features (32 rows binned); with
        `sample_every=n` only every n-th call does any work.
        """
        self._calls += 1
        if self._calls % self.sample_every:
            return None
        predictions = np.asarray(predictions).reshape(-1)
        n = len(next(iter(inputs.values()))) if isinstance(inputs, Mapping) else len(inputs)
        if n == 0:
            return None
        # At most max_rows_per_batch rows, evenly spaced, before the inputs are put side by side.
        step = -(-n // self.max_rows_per_batch) if n > self.max_rows_per_batch else 1
        inputs = self.reference.feature_rows(inputs, step)
        if inputs.ndim != 2 or inputs.shape[1] != len(self.reference.feature_names) or predictions.shape[0] != n:
            raise ValueError(
                f"drift monitor of {self.model!r} expects [rows, {len(self.reference.feature_names)}] inputs "
                f"and one prediction per row; got {inputs.shape} and {predictions.shape}"
            )
        predictions = predictions[::step]
        rows = inputs.shape[0]
        input_counts = self._input_binner.counts(inputs)
        prediction_counts = self._prediction_binner.counts(predictions)
        window = self._window
        window.chunks.append((rows, input_counts, prediction_counts))
        window.rows += rows
        window.inputs = input_counts if window.inputs is None else window.inputs + input_counts
        window.predictions = prediction_counts if window.predictions is None else window.predictions + prediction_counts
        while window.rows - window.chunks[0][0] >= self.window_rows:
            old_rows, old_inputs, old_predictions = window.chunks.popleft()
            window.rows -= old_rows
            window.inputs = window.inputs - old_inputs
            window.predictions = window.predictions - old_predictions
        self._since_evaluation += rows
        if self._since_evaluation >= self.evaluate_every_rows and window.rows >= self.min_rows:
            self._since_evaluation = 0
            return self.evaluate()
        return None

    def evaluate(self) -> DriftReport | None:
        """PSI of the current window against the reference; updates metrics, logs crossings."""
        window = self._window
        if window.inputs is None or window.predictions is None or window.rows == 0:
            return None
        report = DriftReport(
            rows=window.rows,
            input_psi=psi(self.reference.input_expected, window.inputs),
            prediction_psi=float(psi(self.reference.prediction_expected, window.predictions)[0]),
            threshold=self.threshold,
            feature_names=self.reference.feature_names,
        )
        self.last_report = report
        if self._instruments is not None:
            self._instruments.publish(report)
        self._alert("input", report.input_drift, report.max_input_psi, report)
        self._alert("prediction", report.prediction_drift, report.prediction_psi, report)
        return report

    def _alert(self, kind: str, drifting: bool, value: float, report: DriftReport) -> None:
        if drifting == self._alerting[kind]:
            return
        self._alerting[kind] = drifting
        fields: dict[str, Any] = {
            "model": self.model,
            "model_version": self.version,
            "drift_kind": kind,
            "psi": round(value, 4),
            "threshold": self.threshold,
            "window_rows": report.rows,
        }
        if kind == "input":
            fields["features"] = report.drifted_features[:8]
        if drifting:
            if self._instruments is not None:
                self._instruments.alerts[kind].inc()
            self._log.warning("drift threshold exceeded", **fields)
        else:
            self._log.info("drift back under threshold", **fields)


class _Instruments:
    """The drift gauges of one model version, bound once (no label lookups per batch)."""

    def __init__(self, metrics: Any, model: str, version: str, features: Sequence[str]) -> None:
        prefix = metrics.service
        existing = getattr(metrics, "_drift_instruments", None)
        if existing is None:
            existing = metrics._drift_instruments = {
                "input": metrics.gauge(
                    f"{prefix}_input_drift_psi",
                    "Population stability index of each model input feature over the sliding window, "
                    "against the reference saved with the model.",
                    ("model", "version", "feature"),
                ),
                "input_max": metrics.gauge(
                    f"{prefix}_input_drift_psi_max",
                    "Largest per-feature input PSI of the model over the sliding window.",
                    ("model", "version"),
                ),
                "prediction": metrics.gauge(
                    f"{prefix}_prediction_drift_psi",
                    "Population stability index of the model's predictions over the sliding window.",
                    ("model", "version"),
                ),
                "window": metrics.gauge(
                    f"{prefix}_drift_window_rows",
                    "Rows in the drift monitor's sliding window.",
                    ("model", "version"),
                ),
                "threshold": metrics.gauge(
                    f"{prefix}_drift_threshold",
                    "PSI above which drift is reported.",
                    ("model", "version"),
                ),
                "alerts": metrics.counter(
                    f"{prefix}_drift_alerts_total",
                    "Times a drift PSI crossed the threshold (input or prediction).",
                    ("model", "version", "kind"),
                ),
            }
        family = existing
        self.features = [family["input"].labels(model, version, name) for name in features]
        self.input_max = family["input_max"].labels(model, version)
        self.prediction = family["prediction"].labels(model, version)
        self.window = family["window"].labels(model, version)
        self.threshold = family["threshold"].labels(model, version)
        self.alerts = {kind: family["alerts"].labels(model, version, kind) for kind in ("input", "prediction")}

    def publish(self, report: DriftReport) -> None:
        for gauge, value in zip(self.features, report.input_psi.tolist(), strict=True):
            gauge.set(value)
        self.input_max.set(report.max_input_psi)
        self.prediction.set(report.prediction_psi)
        self.window.set(report.rows)
        self.threshold.set(report.threshold)
