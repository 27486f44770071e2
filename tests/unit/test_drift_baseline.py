"""A drift reference of several named model inputs: which models it fits, and how it puts
their rows side by side (the scoring service observes a request's inputs by name)."""

from __future__ import annotations

import numpy as np

from services.scoring.drift import DriftMonitor, DriftReference

IDS, DENSE = 2, 3


def reference(with_inputs: bool = True) -> DriftReference:
    rows = np.random.default_rng(0).standard_normal((500, IDS + DENSE))
    return DriftReference.build(
        rows,
        rows.sum(axis=1),
        feature_names=["ids_0", "ids_1", "age", "price", "dwell"],
        model_inputs=[("ids", IDS), ("dense", DENSE)] if with_inputs else (),
    )


def test_it_fits_only_a_model_with_the_same_inputs_and_widths() -> None:
    two = reference()
    assert two.matches([("dense", (DENSE,)), ("ids", (IDS,))]) == ""
    assert two.matches([("ids", (-1,)), ("dense", (DENSE,))]) == ""  # a free dim fits any width
    assert two.matches([("ids", (IDS,)), ("dense", (4,))]) == (
        "the reference has 3 features for input 'dense'; the model takes 4"
    )
    assert two.matches([("ids", (IDS,))]) == "the reference's input 'dense' is not an input of the model"
    assert two.matches([("ids", (IDS,)), ("dense", (DENSE,)), ("extra", (1,))]) == (
        "the reference covers 2 of the model's 3 inputs"
    )
    legacy = reference(with_inputs=False)  # the demo's: the features are the model's one input
    assert legacy.matches([("features", (IDS + DENSE,))]) == ""
    assert legacy.matches([("a", (1,)), ("b", (4,))]) == "the reference has no model_inputs; the model has 2 inputs"


def test_json_round_trip_keeps_the_inputs() -> None:
    two = reference()
    again = DriftReference.from_json(two.to_json())
    assert again.inputs == (("ids", IDS), ("dense", DENSE)) and again.feature_names == two.feature_names


def test_named_inputs_are_observed_side_by_side_in_the_references_order() -> None:
    monitor = DriftMonitor(reference(), min_rows=10, evaluate_every_rows=10, max_rows_per_batch=1_000)
    rng = np.random.default_rng(1)
    for _ in range(3):
        batch = {  # the request's order differs from the reference's
            "dense": rng.standard_normal((40, DENSE)).astype(np.float32),
            "ids": rng.standard_normal((40, IDS)),
        }
        report = monitor.observe(batch, rng.standard_normal(40))
    assert report is not None and report.input_psi.shape == (IDS + DENSE,) and monitor.rows == 120
    shifted = {"dense": rng.standard_normal((400, DENSE)) + 3.0, "ids": rng.standard_normal((400, IDS))}
    report = DriftMonitor(reference(), min_rows=10, evaluate_every_rows=10, max_rows_per_batch=1_000).observe(
        shifted, rng.standard_normal(400)
    )
    assert report is not None
    assert set(report.drifted_features) == {"age", "price", "dwell"}
