"""Model monitoring: shifted inputs raise the PSI metric above the threshold (and log it);
unshifted inputs stay below; the reference is written beside the model and reused."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from services.runtime.metrics import Metrics
from services.scoring.drift import (
    REFERENCE_NAME,
    DriftMonitor,
    DriftReference,
    bin_counts,
    ensure_drift_reference,
    psi,
    quantile_cuts,
    reference_path,
)

FEATURES = 8
THRESHOLD = 0.2


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, message: str, **fields: Any) -> None:
        self.events.append(("warning", message, fields))

    def info(self, message: str, **fields: Any) -> None:
        self.events.append(("info", message, fields))


def _model(inputs: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-inputs.mean(axis=1)))


def _sample(rng: np.random.Generator, rows: int, shift: float = 0.0, shifted: tuple[int, ...] = ()) -> np.ndarray:
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    for column in shifted:
        x[:, column] += shift
    return x


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    x = _sample(np.random.default_rng(1), 20_000)
    return DriftReference.build(x, _model(x), feature_names=[f"f{i}" for i in range(FEATURES)])


def _monitor(reference: DriftReference, metrics: Metrics, log: RecordingLog) -> DriftMonitor:
    return DriftMonitor(
        reference,
        metrics=metrics,
        model="ranker",
        version="1",
        threshold=THRESHOLD,
        window_rows=4_000,
        min_rows=1_000,
        evaluate_every_rows=500,
        max_rows_per_batch=64,
        logger=log,
    )


def _feed(monitor: DriftMonitor, rng: np.random.Generator, batches: int, **shift: Any) -> None:
    for _ in range(batches):
        x = _sample(rng, 200, **shift)
        monitor.observe(x, _model(x))


def _gauge(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model": "ranker", "version": "1", **labels})
    assert value is not None, (name, labels)
    return value


def test_unshifted_inputs_stay_below_threshold(reference: DriftReference) -> None:
    metrics, log = Metrics("scoring"), RecordingLog()
    monitor = _monitor(reference, metrics, log)
    _feed(monitor, np.random.default_rng(2), 100)
    assert monitor.rows >= 1_000
    for i in range(FEATURES):
        assert _gauge(metrics, "scoring_input_drift_psi", feature=f"f{i}") < THRESHOLD
    assert _gauge(metrics, "scoring_input_drift_psi_max") < THRESHOLD
    assert _gauge(metrics, "scoring_prediction_drift_psi") < THRESHOLD
    assert _gauge(metrics, "scoring_drift_threshold") == THRESHOLD
    assert not log.events
    assert (
        metrics.registry.get_sample_value(
            "scoring_drift_alerts_total", {"model": "ranker", "version": "1", "kind": "input"}
        )
        == 0.0
    )


def test_shifted_inputs_raise_psi_above_threshold_and_log(reference: DriftReference) -> None:
    metrics, log = Metrics("scoring"), RecordingLog()
    monitor = _monitor(reference, metrics, log)
    rng = np.random.default_rng(3)
    _feed(monitor, rng, 100, shift=1.0, shifted=(3, 5))
    assert _gauge(metrics, "scoring_input_drift_psi", feature="f3") > THRESHOLD
    assert _gauge(metrics, "scoring_input_drift_psi", feature="f5") > THRESHOLD
    for i in (0, 1, 2, 4, 6, 7):
        assert _gauge(metrics, "scoring_input_drift_psi", feature=f"f{i}") < THRESHOLD
    assert _gauge(metrics, "scoring_input_drift_psi_max") > THRESHOLD
    assert _gauge(metrics, "scoring_prediction_drift_psi") > THRESHOLD  # the model's output moved too
    alerts = [(level, message, fields) for level, message, fields in log.events]
    kinds = {fields["drift_kind"] for level, message, fields in alerts if message == "drift threshold exceeded"}
    assert kinds == {"input", "prediction"}
    (input_alert,) = [f for _, m, f in alerts if m == "drift threshold exceeded" and f["drift_kind"] == "input"]
    assert set(input_alert["features"]) == {"f3", "f5"}
    assert input_alert["psi"] > THRESHOLD and input_alert["model"] == "ranker"
    # One alert per crossing, not one per evaluation.
    assert (
        metrics.registry.get_sample_value(
            "scoring_drift_alerts_total", {"model": "ranker", "version": "1", "kind": "input"}
        )
        == 1.0
    )

    # The window slides: back to normal traffic, the PSI falls and the recovery is logged.
    _feed(monitor, rng, 200)
    assert _gauge(metrics, "scoring_input_drift_psi_max") < THRESHOLD
    assert any(m == "drift back under threshold" for _, m, _ in log.events)


def test_psi_maths() -> None:
    expected = np.full(10, 0.1)
    assert psi(expected, expected) == pytest.approx(0.0)
    assert psi(expected, np.array([0.5] + [0.5 / 9] * 9)) > 0.25
    values = np.arange(100, dtype=np.float64)
    cuts = quantile_cuts(values, 4)
    assert bin_counts(values, cuts).tolist() == [[25, 25, 25, 25]]


def test_reference_round_trip(tmp_path: Path, reference: DriftReference) -> None:
    saved = reference.save(tmp_path / REFERENCE_NAME)
    assert saved.stat().st_mode & 0o777 == 0o644  # readable as the model files beside it are
    loaded = DriftReference.load(saved)
    assert loaded.feature_names == reference.feature_names
    assert np.allclose(loaded.input_cuts, reference.input_cuts)
    assert np.allclose(loaded.input_expected, reference.input_expected)
    assert np.allclose(loaded.prediction_expected, reference.prediction_expected)
    assert loaded.bins == 10 and np.allclose(loaded.input_expected.sum(axis=1), 1.0)


@dataclass
class TinyCatalog:
    seed: int
    user_vecs: np.ndarray
    item_vecs: np.ndarray


def _write_model(path: Path, scale: float) -> None:
    weights = helper.make_tensor("w", TensorProto.FLOAT, [8, 1], [scale] * 8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["score"])],
        "tiny",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def test_ensure_drift_reference_writes_beside_the_model_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    catalog = TinyCatalog(7, rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(500, 4)).astype(np.float32))
    model = tmp_path / "models" / "tiny" / "1" / "model.onnx"
    _write_model(model, 0.5)
    path = ensure_drift_reference(model, catalog, rows=2_000)
    assert path == reference_path(model) == model.parent / "drift_reference.json"
    first = DriftReference.load(path)
    assert first.feature_names == ("user_0", "user_1", "user_2", "user_3", "item_0", "item_1", "item_2", "item_3")
    assert first.rows == 2_000 and len(first.model_sha256) == 64
    os.utime(path, (1, 1))
    ensure_drift_reference(model, catalog, rows=2_000)
    assert path.stat().st_mtime == 1  # up to date: not rewritten
    _write_model(model, 2.0)  # retrained model: new reference
    ensure_drift_reference(model, catalog, rows=2_000)
    second = DriftReference.load(path)
    assert second.model_sha256 != first.model_sha256
    assert not np.allclose(second.prediction_cuts, first.prediction_cuts)
    monitor = DriftMonitor.for_model(model, model="tiny", version="1")
    assert monitor is not None and monitor.reference.model_sha256 == second.model_sha256
    assert DriftMonitor.for_model(tmp_path / "nowhere" / "model.onnx") is None


def test_observe_checks_shapes(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference, logger=RecordingLog())
    with pytest.raises(ValueError, match="expects"):
        monitor.observe(np.zeros((4, FEATURES + 1), np.float32), np.zeros(4, np.float32))
    assert monitor.observe(np.zeros((0, FEATURES), np.float32), np.zeros(0, np.float32)) is None


def test_binning_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(size=(2_000, 7))
    values[:5], values[5:10] = 1e9, -1e9  # far outside the reference range
    cuts = np.sort(rng.normal(size=(7, 9)), axis=1)
    cuts[3] = 0.0  # a constant feature: every cut equal
    values[20:30, 3] = 0.0  # values exactly on a cut go to the lower bin
    brute = np.stack(
        [np.bincount((values[:, f][:, None] > cuts[f][None, :]).sum(axis=1), minlength=10) for f in range(7)]
    )
    assert (bin_counts(values, cuts) == brute).all()


def test_sample_every_skips_whole_batches(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference, logger=RecordingLog(), sample_every=4, max_rows_per_batch=1_000)
    x = _sample(np.random.default_rng(6), 100)
    for _ in range(8):
        monitor.observe(x, _model(x))
    assert monitor.rows == 200
