import numpy as np
import pytest

from services.ranking.rank import RankInput, decode, occurrence_within_group, top_k
from services.runtime.errors import InvalidArgument


def ranked(scores, categories, present=None) -> RankInput:
    n = len(scores)
    return RankInput(
        np.asarray(scores, "<f4"),
        np.asarray(categories, "<i4"),
        np.ones(n, bool) if present is None else np.asarray(present, bool),
    )


def test_orders_by_score_and_caps_each_category() -> None:
    chosen = top_k(ranked([0.9, 0.8, 0.7, 0.95, 0.1, 0.6], [1, 1, 1, 2, 2, 3]), k=10, max_per_category=2)
    assert chosen.tolist() == [3, 0, 1, 5, 4]


def test_cap_matches_a_plain_python_reference() -> None:
    rng = np.random.default_rng(3)
    scores = rng.random(500).astype("f4")
    categories = rng.integers(0, 12, 500).astype("i4")
    present = rng.random(500) > 0.1
    got = top_k(ranked(scores, categories, present), k=40, max_per_category=3).tolist()
    expected, taken = [], {}
    for i in sorted(range(500), key=lambda i: (-float(scores[i]), i)):
        if present[i] and taken.get(categories[i], 0) < 3 and len(expected) < 40:
            expected.append(i)
            taken[categories[i]] = taken.get(categories[i], 0) + 1
    assert got == expected


def test_ties_break_by_request_position_and_nan_ranks_last() -> None:
    chosen = top_k(ranked([0.5, np.nan, 0.5, 0.7], [1, 2, 3, 4]), k=4, max_per_category=0)
    assert chosen.tolist() == [3, 0, 2, 1]


def test_absent_items_are_never_returned() -> None:
    chosen = top_k(ranked([0.9, 0.8], [1, 2], [False, True]), k=2, max_per_category=0)
    assert chosen.tolist() == [1]


def test_k_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="k must be positive"):
        top_k(ranked([0.1], [1]), k=0, max_per_category=0)


def test_occurrence_within_group() -> None:
    assert occurrence_within_group(np.array([5, 1, 5, 5, 1])).tolist() == [0, 0, 1, 2, 1]


def test_decode_checks_byte_lengths() -> None:
    good = decode(2, np.zeros(2, "<f4").tobytes(), np.zeros(2, "<i4").tobytes(), b"\x01\x00")
    assert good.present.tolist() == [True, False]
    with pytest.raises(InvalidArgument, match="scores has 4 bytes; 2 items need 8"):
        decode(2, b"\0" * 4, np.zeros(2, "<i4").tobytes(), b"")
    with pytest.raises(InvalidArgument, match="item_present"):
        decode(2, np.zeros(2, "<f4").tobytes(), np.zeros(2, "<i4").tobytes(), b"\x01")
