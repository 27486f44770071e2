"""Reference workload: catalog, ground truth, the numpy-trained ranker and its ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from infermesh.workload import seed as seed_mod
from infermesh.workload.catalog import Catalog, affinity, generate_catalog, model_input, ndcg_at_k
from infermesh.workload.model import (
    INPUT_NAME,
    OUTPUT_NAME,
    MlpWeights,
    build_onnx,
    export_onnx,
    train_mlp,
)
from services.features.layout import FEATURE_DIM, ITEM_RECORD, MODEL_INPUT_DIM, USER_RECORD

# Small enough to keep the whole module to a few seconds.
N_USERS, N_ITEMS, N_CATEGORIES = 2_000, 5_000, 20
TRAIN_STEPS, TRAIN_BATCH = 300, 512


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return generate_catalog(seed=7, n_users=N_USERS, n_items=N_ITEMS, n_categories=N_CATEGORIES)


@pytest.fixture(scope="module")
def weights(catalog: Catalog) -> MlpWeights:
    return train_mlp(catalog, seed=7, steps=TRAIN_STEPS, batch=TRAIN_BATCH)


def _small(seed: int) -> Catalog:
    return generate_catalog(seed=seed, n_users=N_USERS, n_items=N_ITEMS, n_categories=N_CATEGORIES)


# ---------------------------------------------------------------------------- catalog


def test_catalog_is_deterministic_per_seed(catalog: Catalog) -> None:
    again = _small(7)
    for field in ("user_vecs", "item_vecs", "item_category", "item_price"):
        np.testing.assert_array_equal(getattr(catalog, field), getattr(again, field))
    assert catalog.user_ids == again.user_ids and catalog.item_ids == again.item_ids

    other = _small(8)
    assert not np.array_equal(catalog.user_vecs, other.user_vecs)
    assert not np.array_equal(catalog.item_vecs, other.item_vecs)
    assert not np.array_equal(catalog.item_category, other.item_category)


def test_catalog_shapes_dtypes_and_ids(catalog: Catalog) -> None:
    assert catalog.user_vecs.shape == (N_USERS, FEATURE_DIM) and catalog.user_vecs.dtype == np.float32
    assert catalog.item_vecs.shape == (N_ITEMS, FEATURE_DIM) and catalog.item_vecs.dtype == np.float32
    assert catalog.item_category.shape == (N_ITEMS,) and catalog.item_category.dtype == np.int32
    assert catalog.item_price.shape == (N_ITEMS,) and catalog.item_price.dtype == np.float32
    assert catalog.user_ids[0] == "u0" and catalog.user_ids[-1] == f"u{N_USERS - 1}"
    assert catalog.item_ids[0] == "i0" and catalog.item_ids[-1] == f"i{N_ITEMS - 1}"
    assert len(set(catalog.item_ids)) == N_ITEMS
    assert catalog.n_categories == N_CATEGORIES and catalog.seed == 7
    assert catalog.item_category.min() >= 0 and catalog.item_category.max() < N_CATEGORIES
    assert len(np.unique(catalog.item_category)) == N_CATEGORIES
    assert np.all(catalog.item_price > 0) and np.all(np.isfinite(catalog.item_price))
    assert np.all(np.isfinite(catalog.user_vecs)) and np.all(np.isfinite(catalog.item_vecs))


def test_catalog_arrays_are_read_only(catalog: Catalog) -> None:
    with pytest.raises(ValueError):
        catalog.item_vecs[0, 0] = 1.0


def test_items_carry_category_signal(catalog: Catalog) -> None:
    # Items sit nearer their own category's mean than the nearest other category's mean.
    means = np.stack([catalog.item_vecs[catalog.item_category == c].mean(axis=0) for c in range(N_CATEGORIES)])
    dist = np.linalg.norm(catalog.item_vecs[:, None, :] - means[None, :, :], axis=2)
    assert np.mean(dist.argmin(axis=1) == catalog.item_category) > 0.9


# ---------------------------------------------------------------------------- ground truth


def test_affinity_range_and_spread(catalog: Catalog) -> None:
    rng = np.random.default_rng(0)
    users = catalog.user_vecs[rng.integers(0, N_USERS, 20_000)]
    items = catalog.item_vecs[rng.integers(0, N_ITEMS, 20_000)]
    a = affinity(users, items)
    assert a.dtype == np.float32 and a.shape == (20_000,)
    assert np.all((a > 0) & (a < 1))
    assert a.std() > 0.15
    low, high = np.percentile(a, [10, 90])
    assert low < 0.15 and high > 0.5


def test_affinity_is_a_function_of_the_pair_only(catalog: Catalog) -> None:
    u, items = catalog.user_vecs[3], catalog.item_vecs[:300]
    broadcast = affinity(u[None, :], items)
    rows = affinity(np.repeat(u[None, :], 300, axis=0), items)
    single = np.array([affinity(u, items[j]) for j in (0, 150, 299)])
    np.testing.assert_array_equal(broadcast, rows)
    np.testing.assert_allclose(single, broadcast[[0, 150, 299]], rtol=1e-6)


def test_model_input_layout(catalog: Catalog) -> None:
    x = model_input(catalog.user_vecs[5], catalog.item_vecs[10:17])
    assert x.shape == (7, MODEL_INPUT_DIM) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[:, :FEATURE_DIM], np.repeat(catalog.user_vecs[5][None], 7, axis=0))
    np.testing.assert_array_equal(x[:, FEATURE_DIM:], catalog.item_vecs[10:17])


def test_ndcg_bounds() -> None:
    gains = np.array([0.9, 0.1, 0.5, 0.0, 0.7])
    assert ndcg_at_k(gains, gains, k=3) == pytest.approx(1.0)
    assert ndcg_at_k(-gains, gains, k=3) < 0.5
    batch = np.stack([gains, gains[::-1]])
    assert ndcg_at_k(batch, batch, k=5) == pytest.approx(1.0)
    assert ndcg_at_k(np.zeros(5), np.zeros(5)) == 0.0


# ---------------------------------------------------------------------------- model


def test_training_is_deterministic(catalog: Catalog) -> None:
    a = train_mlp(catalog, seed=3, steps=5, batch=64)
    b = train_mlp(catalog, seed=3, steps=5, batch=64)
    c = train_mlp(catalog, seed=4, steps=5, batch=64)
    for pa, pb in zip(a.params(), b.params(), strict=False):
        np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(a.w1, c.w1)
    assert all(p.dtype == np.float32 for p in a.params())


def test_onnx_export_matches_numpy(weights: MlpWeights, catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    export_onnx(weights, path)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1]) == (INPUT_NAME, "tensor(float)", MODEL_INPUT_DIM)
    assert (out.name, out.type, out.shape[1]) == (OUTPUT_NAME, "tensor(float)", 1)
    assert isinstance(inp.shape[0], str)  # dynamic batch

    x = model_input(catalog.user_vecs[0], catalog.item_vecs[:257])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    assert got.shape == (257, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, weights.forward(x), atol=1e-5, rtol=0)


def test_onnx_bytes_are_deterministic(weights: MlpWeights, tmp_path: Path) -> None:
    export_onnx(weights, tmp_path / "a.onnx")
    export_onnx(weights, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert build_onnx(weights).SerializeToString(deterministic=True) == (tmp_path / "a.onnx").read_bytes()


def test_trained_model_ranks_far_better_than_random(weights: MlpWeights, catalog: Catalog) -> None:
    rng = np.random.default_rng(2024)
    users = rng.choice(N_USERS, 50, replace=False)
    cands = np.stack([rng.choice(N_ITEMS, 200, replace=False) for _ in users])
    gains = affinity(catalog.user_vecs[users][:, None, :], catalog.item_vecs[cands])
    preds = np.stack(
        [
            weights.forward(model_input(catalog.user_vecs[u], catalog.item_vecs[c]))[:, 0]
            for u, c in zip(users, cands, strict=False)
        ]
    )
    model_ndcg = ndcg_at_k(preds, gains, k=20)
    random_ndcgs = [ndcg_at_k(rng.random(gains.shape), gains, k=20) for _ in range(20)]
    random_ndcg = float(np.mean(random_ndcgs))
    # The model must close at least half the gap from random to perfect ranking.
    assert model_ndcg >= random_ndcg + 0.5 * (1.0 - random_ndcg), (model_ndcg, random_ndcg)
    assert model_ndcg > max(random_ndcgs)


# ---------------------------------------------------------------------------- records and files


def test_records_round_trip(catalog: Catalog) -> None:
    items = seed_mod.item_records(catalog)
    assert ITEM_RECORD.itemsize == 136
    blob = items[42].tobytes()
    assert len(blob) == ITEM_RECORD.itemsize
    back = np.frombuffer(blob, dtype=ITEM_RECORD)[0]
    np.testing.assert_array_equal(back["vec"], catalog.item_vecs[42])
    assert back["category"] == catalog.item_category[42]
    assert back["price"] == catalog.item_price[42]

    many = np.frombuffer(items[100:300].tobytes(), dtype=ITEM_RECORD)
    np.testing.assert_array_equal(many["vec"], catalog.item_vecs[100:300])

    users = np.frombuffer(seed_mod.user_records(catalog)[:10].tobytes(), dtype=USER_RECORD)
    np.testing.assert_array_equal(users["vec"], catalog.user_vecs[:10])


def test_ensure_model_trains_once_and_retrains_for_another_seed(catalog: Catalog, tmp_path: Path) -> None:
    path = seed_mod.ensure_model(tmp_path, seed=7, catalog=catalog, progress=False, steps=5)
    assert path == tmp_path / "models" / "ranker" / "1" / "model.onnx" == seed_mod.model_path(tmp_path)
    config = json.loads((tmp_path / "models" / "ranker" / "config.json").read_text())
    assert config == {
        "name": "ranker",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": 4096,
    }
    sidecar = json.loads((path.parent / "trained.json").read_text())
    assert sidecar["spec"]["seed"] == 7 and sidecar["spec"]["n_items"] == N_ITEMS

    first_mtime = path.stat().st_mtime_ns
    seed_mod.ensure_model(tmp_path, seed=7, catalog=catalog, progress=False, steps=5)
    assert path.stat().st_mtime_ns == first_mtime  # current: not retrained

    before = path.read_bytes()
    seed_mod.ensure_model(tmp_path, seed=8, catalog=_small(8), progress=False, steps=5)
    assert path.read_bytes() != before
    assert json.loads((path.parent / "trained.json").read_text())["spec"]["seed"] == 8
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_ensure_model_rejects_catalog_from_other_seed(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        seed_mod.ensure_model(tmp_path, seed=8, catalog=catalog, progress=False, steps=5)


def test_cli_defaults_come_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERMESH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:1/2")
    args = seed_mod.build_parser().parse_args([])
    assert args.data_dir == tmp_path and args.redis_url == "redis://example.invalid:1/2"
    assert args.seed == 7 and not args.force and not args.no_progress


def test_redact_url_hides_password() -> None:
    assert seed_mod.redact_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert seed_mod.redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
