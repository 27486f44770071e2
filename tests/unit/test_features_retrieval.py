"""Candidate retrieval over the reference catalog: recall against exact search, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infermesh.workload.catalog import generate_catalog
from services.features.retrieval import CandidateIndex, exact_top, read_spec, recall_at


@pytest.fixture(scope="module")
def catalog():
    return generate_catalog()


@pytest.fixture(scope="module")
def index(catalog) -> CandidateIndex:
    return CandidateIndex.build(catalog.item_vecs, catalog.item_ids, {"source": "test"})


def test_recall_at_100_against_exact_search_on_the_reference_catalog(catalog, index: CandidateIndex) -> None:
    assert index.spec["kind"] == "ivf_flat" and index.size == catalog.n_items
    queries = catalog.user_vecs[::50]  # 200 users spread over the catalog
    assert recall_at(index, catalog.item_vecs, queries, 100) >= 0.95


def test_search_returns_ids_best_first_with_their_scores(catalog, index: CandidateIndex) -> None:
    ids, scores = index.search(catalog.user_vecs[42], 100)
    assert len(ids) == 100 == len(set(ids)) and scores.dtype == np.dtype("<f4")
    assert (np.diff(scores) <= 1e-6).all()
    labels = [int(i[1:]) for i in ids]
    np.testing.assert_allclose(scores, catalog.item_vecs[labels] @ catalog.user_vecs[42], rtol=1e-5, atol=1e-5)


def test_small_catalogs_use_an_exact_index() -> None:
    small = generate_catalog(n_users=10, n_items=500, n_categories=5)
    index = CandidateIndex.build(small.item_vecs, small.item_ids)
    assert index.spec["kind"] == "flat"
    ids, _ = index.search(small.user_vecs[0], 600)  # more than the catalog holds
    assert len(ids) == 500
    truth = exact_top(small.item_vecs, small.user_vecs[0], 20)
    assert [int(i[1:]) for i in ids[:20]] == truth.tolist()


def test_saved_index_loads_identically(tmp_path: Path, catalog, index: CandidateIndex) -> None:
    path = tmp_path / "index" / "items.npz"
    index.save(path)
    assert read_spec(path)["source"] == "test" and read_spec(tmp_path / "nope.npz") is None
    loaded = CandidateIndex.load(path)
    for user in (0, 7, 9_999):
        assert loaded.search(catalog.user_vecs[user], 50)[0] == index.search(catalog.user_vecs[user], 50)[0]
    assert [p.name for p in path.parent.iterdir()] == ["items.npz"]  # no temporary file left behind


def test_query_of_the_wrong_width_is_rejected(index: CandidateIndex) -> None:
    with pytest.raises(ValueError, match="values"):
        index.search(np.zeros(5, np.float32), 10)
