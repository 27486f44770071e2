"""The ranking chain stage by stage: order and tie-breaks, rules, calibration, category cap,
MMR, pagination and explanations, against plain-Python references where one exists."""

from __future__ import annotations

import numpy as np
import pytest

from services.ranking.chain import (
    Calibration,
    Candidates,
    CategoryCap,
    Chain,
    Mmr,
    Rules,
    initial_order,
    mmr_select,
    piecewise_linear,
    platt,
)
from services.ranking.rank import RankInput, top_k
from services.runtime.errors import InvalidArgument


def candidates(scores, categories=None, present=None, embeddings=None, **kwargs) -> Candidates:
    scores = np.asarray(scores, "<f4")
    n = len(scores)
    return Candidates(
        item_ids=[f"i{i}" for i in range(n)],
        scores=scores,
        categories=np.asarray(np.arange(n) if categories is None else categories, "<i4"),
        present=np.ones(n, bool) if present is None else np.asarray(present, bool),
        embeddings=None if embeddings is None else np.asarray(embeddings, "<f4"),
        **kwargs,
    )


def random_candidates(seed: int, n: int = 300, **kwargs) -> Candidates:
    rng = np.random.default_rng(seed)
    # Coarse scores so ties are common; a few NaN and absent items.
    scores = np.round(rng.random(n), 2).astype("f4")
    scores[rng.choice(n, 5, replace=False)] = np.nan
    return candidates(
        scores,
        rng.integers(0, 12, n),
        rng.random(n) > 0.1,
        rng.standard_normal((n, 8)),
        **kwargs,
    )


def reference_order(c: Candidates) -> list[int]:
    """Plain Python: present items by score descending, ties by position, NaN last."""
    keys = [(np.isnan(s), -s if not np.isnan(s) else 0.0, i) for i, s in enumerate(c.scores.tolist())]
    return [i for _, _, i in sorted(keys) if c.present[i]]


async def test_initial_order_breaks_ties_by_position_and_puts_nan_last() -> None:
    for seed in range(5):
        c = random_candidates(seed)
        assert initial_order(c.scores, c.present).tolist() == reference_order(c)


async def test_ties_rank_the_same_way_every_time_and_follow_request_position() -> None:
    chain = Chain([CategoryCap()])
    c = candidates([0.5, 0.9, 0.5, 0.5, 0.9], k=5)
    first = (await chain.rank(c)).page.tolist()
    assert first == [1, 4, 0, 2, 3]
    for _ in range(5):
        assert (await chain.rank(candidates([0.5, 0.9, 0.5, 0.5, 0.9], k=5))).page.tolist() == first
    # Moving an item in the request moves it among its ties, and nowhere else.
    swapped = (await chain.rank(candidates([0.5, 0.5, 0.9, 0.5, 0.9], k=5))).page.tolist()
    assert swapped == [2, 4, 0, 1, 3]


async def test_default_chain_reproduces_top_k_with_the_category_cap() -> None:
    # What requests without a user id got before the chain existed, embeddings or not:
    # MMR's default lambda is 1 (pure relevance) and calibration/rules are off.
    chain = Chain([Rules(), Calibration(None, "none"), CategoryCap(), Mmr(1.0, 100)])
    for seed in range(5):
        c = random_candidates(seed, max_per_category=3, k=40)
        expected = top_k(RankInput(c.scores, c.categories, c.present), 40, 3)
        got = await chain.rank(c)
        assert got.page.tolist() == expected.tolist()
        assert got.skipped == [] and got.explanations is None
        assert np.array_equal(got.scores, c.scores, equal_nan=True)


async def test_category_cap_matches_a_plain_python_reference() -> None:
    c = random_candidates(7, max_per_category=2, k=1000)
    got = (await Chain([CategoryCap()]).rank(c)).page.tolist()
    expected, taken = [], {}
    for i in reference_order(c):
        category = int(c.categories[i])
        if taken.get(category, 0) < 2:
            expected.append(i)
            taken[category] = taken.get(category, 0) + 1
    assert got == expected


async def test_rules_deny_categories_and_bound_scores() -> None:
    c = candidates([0.9, 0.8, 0.05, 0.7, np.nan, 0.99], [1, 2, 3, 4, 5, 6], k=10)
    got = await Chain([Rules(deny_categories=[2], min_score=0.1, max_score=0.95)]).rank(c)
    # 1: denied category; 2: below the minimum; 4: NaN fails a minimum; 5: above the maximum.
    assert got.page.tolist() == [0, 3]
    assert got.total == 2


async def test_rules_see_calibrated_scores_when_placed_after_calibration() -> None:
    double = Calibration(lambda s: np.minimum(2 * s, 1.0), "double")
    before = await Chain([Rules(min_score=0.5), double]).rank(candidates([0.3, 0.6], k=2))
    after = await Chain([double, Rules(min_score=0.5)]).rank(candidates([0.3, 0.6], k=2))
    assert before.page.tolist() == [1]
    assert after.page.tolist() == [1, 0]


def test_platt_and_piecewise_are_monotone() -> None:
    rng = np.random.default_rng(1)
    x = np.sort(np.concatenate([rng.random(10_000), [0.0, 1.0, 1e-12, 1 - 1e-12]]))
    for function in (
        platt(2.0, -0.5),
        platt(0.3, 1.0),
        platt(1.5, 0.0, "logit"),
        piecewise_linear([0.0, 0.2, 0.5, 1.0], [0.0, 0.1, 0.1, 1.0]),
    ):
        y = function(x)
        assert np.all(np.isfinite(y)) and np.all(np.diff(y) >= 0)
        assert y.min() >= 0.0 and y.max() <= 1.0
    # Platt is strictly increasing away from saturation; a=1, b=0 is the identity.
    assert np.all(np.diff(platt(2.0, -0.5)(np.linspace(0.01, 0.99, 500))) > 0)
    assert np.allclose(platt(1.0, 0.0)(x[5:-5]), x[5:-5], atol=1e-9)
    # Temperature T = 2 (a = 1/2) pulls scores towards 0.5 without crossing it.
    assert 0.5 < platt(0.5, 0.0)(np.array([0.9]))[0] < 0.9
    assert np.isnan(platt(2.0, 0.0)(np.array([np.nan])))[0]


def test_calibration_maps_refuse_to_be_non_monotone() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        platt(-1.0, 0.0)
    with pytest.raises(ValueError, match="must not decrease"):
        piecewise_linear([0.0, 0.5, 1.0], [0.0, 0.6, 0.4])
    with pytest.raises(ValueError, match="increase strictly"):
        piecewise_linear([0.0, 0.5, 0.5], [0.0, 0.6, 0.8])


async def test_calibration_rewrites_scores_but_never_the_order() -> None:
    # A flat piece makes calibrated scores tie: the uncalibrated order stands.
    flat = piecewise_linear([0.0, 0.4, 0.8, 1.0], [0.0, 0.5, 0.5, 1.0])
    for seed in range(3):
        c = random_candidates(seed, k=1000)
        raw = c.scores.copy()
        plain = await Chain([]).rank(random_candidates(seed, k=1000))
        got = await Chain([Calibration(flat, "flat")]).rank(c)
        assert got.page.tolist() == plain.page.tolist()
        page = got.page
        assert np.allclose(got.scores[page], flat(raw[page].astype(np.float64)), equal_nan=True)
        assert np.array_equal(c.scores, got.scores, equal_nan=True) and not np.array_equal(
            raw, got.scores, equal_nan=True
        )


def reference_mmr(embeddings: np.ndarray, scores: np.ndarray, lam: float, count: int) -> list[int]:
    """Textbook MMR with Python loops over pairs."""
    unit = [e / np.linalg.norm(e) for e in embeddings.astype(np.float64)]
    lo, hi = float(np.min(scores)), float(np.max(scores))
    relevance = [(float(s) - lo) / (hi - lo) for s in scores]
    picked: list[int] = []
    while len(picked) < count:
        best, best_value = -1, -np.inf
        for i in range(len(scores)):
            if i in picked:
                continue
            penalty = max((float(unit[i] @ unit[j]) for j in picked), default=0.0)
            value = lam * relevance[i] - (1 - lam) * penalty if picked else lam * relevance[i]
            if value > best_value + 1e-12:
                best, best_value = i, value
        picked.append(best)
    return picked


def test_mmr_select_matches_the_textbook_greedy() -> None:
    rng = np.random.default_rng(4)
    for lam in (0.0, 0.3, 0.7, 0.95):
        embeddings = rng.standard_normal((60, 16)).astype("f4")
        scores = rng.random(60)
        picks, closeness = mmr_select(embeddings, scores, lam, 25)
        assert picks.tolist() == reference_mmr(embeddings, scores, lam, 25)
        assert np.isnan(closeness[0]) and np.all(np.abs(closeness[1:]) <= 1 + 1e-6)


def clustered(per_cluster: int = 4, clusters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate items in each cluster; every item of cluster 0 outscores the rest."""
    rng = np.random.default_rng(2)
    centres = np.eye(clusters, 8) * 10
    embeddings = np.repeat(centres, per_cluster, axis=0) + rng.normal(0, 0.1, (clusters * per_cluster, 8))
    scores = np.concatenate([0.9 - 0.01 * np.arange(per_cluster) - 0.2 * c for c in range(clusters)])
    return embeddings.astype("f4"), scores.astype("f4")


async def test_mmr_picks_diverse_items_and_lambda_one_keeps_relevance() -> None:
    embeddings, scores = clustered()
    cluster = np.arange(12) // 4
    diverse = await Chain([Mmr(0.5, 100)]).rank(candidates(scores, embeddings=embeddings, k=3))
    assert sorted(cluster[diverse.page].tolist()) == [0, 1, 2]  # one of each cluster
    assert diverse.page[0] == 0  # the most relevant still leads
    relevant = await Chain([Mmr(1.0, 100)]).rank(candidates(scores, embeddings=embeddings, k=3))
    assert cluster[relevant.page].tolist() == [0, 0, 0]
    # No embeddings: MMR does not apply, the list is the relevance order.
    plain = await Chain([Mmr(0.5, 100)]).rank(candidates(scores, k=3))
    assert plain.page.tolist() == relevant.page.tolist() and plain.skipped == []


async def test_mmr_reorders_only_the_top_n() -> None:
    embeddings, scores = clustered()
    got = await Chain([Mmr(0.5, 4)]).rank(candidates(scores, embeddings=embeddings, k=12))
    assert sorted(got.page[:4].tolist()) == [0, 1, 2, 3]  # the head is cluster 0 only
    assert got.page[4:].tolist() == list(range(4, 12))  # the tail keeps relevance order


@pytest.mark.parametrize("stages", [[CategoryCap()], [CategoryCap(), Mmr(0.6, 50)]], ids=["cap", "cap+mmr"])
async def test_pages_cover_the_list_without_overlap(stages) -> None:
    chain = Chain(stages)
    whole = await chain.rank(random_candidates(3, max_per_category=4, k=10_000))
    pages, offset = [], 0
    while offset < whole.total:
        page = await chain.rank(random_candidates(3, max_per_category=4, k=7, offset=offset))
        assert page.total == whole.total
        pages.extend(page.page.tolist())
        offset += 7
    assert pages == whole.page.tolist()
    assert len(set(pages)) == len(pages) == whole.total


async def test_offset_beyond_the_list_is_invalid() -> None:
    chain = Chain([CategoryCap()])
    total = (await chain.rank(random_candidates(1, max_per_category=2, k=1000))).total
    last = await chain.rank(random_candidates(1, max_per_category=2, k=10, offset=total - 1))
    assert len(last.page) == 1
    with pytest.raises(InvalidArgument, match=f"offset {total} is beyond the ranked list of {total} items"):
        await chain.rank(random_candidates(1, max_per_category=2, k=10, offset=total))
    empty = candidates([0.5, 0.4], present=[False, False], k=5)
    assert (await chain.rank(empty)).page.tolist() == []
    with pytest.raises(InvalidArgument, match="it is empty"):
        await chain.rank(candidates([0.5, 0.4], present=[False, False], k=5, offset=1))
    with pytest.raises(InvalidArgument, match="k must be positive"):
        await chain.rank(candidates([0.5], k=0))


async def test_explain_names_the_stage_that_removed_or_moved_each_item() -> None:
    embeddings, scores = clustered()
    categories = np.arange(12) // 4
    present = np.ones(12, bool)
    present[11] = False
    c = candidates(scores, categories, present, embeddings, max_per_category=3, k=2, explain=True)
    chain = Chain([Rules(min_score=0.495), CategoryCap(), Mmr(0.5, 100)])
    got = await chain.rank(c)
    assert got.explanations is not None and len(got.explanations) == 12

    def effects(item: int) -> dict[str, tuple[str, int, int, str]]:
        return {e.stage: (e.effect, e.rank_before, e.rank_after, e.detail) for e in got.explanations[item]}

    # Item 11 was absent: removed before any stage saw it.
    assert list(effects(11)) == ["order"] and effects(11)["order"][0] == "removed"
    # Item 9 scores 0.49: below the rules' minimum.
    assert effects(9)["rules"][0] == "removed" and "below the minimum" in effects(9)["rules"][3]
    assert "category_cap" not in effects(9)
    # Item 3 is cluster 0's fourth: the cap of 3 removes it.
    assert effects(3)["category_cap"][:3] == ("removed", 3, -1)
    assert "category 0 already has 3 items" in effects(3)["category_cap"][3]
    # MMR lifts item 4 (best of cluster 1) above items 1 and 2 (near-duplicates of item 0).
    assert got.page.tolist() == [0, 4]
    mmr4 = effects(4)["mmr"]
    assert mmr4[0] == "moved" and (mmr4[1], mmr4[2]) == (3, 1) and "max cosine" in mmr4[3]
    assert effects(1)["mmr"][0] == "moved" and effects(1)["mmr"][2] > 1
    assert effects(0)["mmr"][0] == "kept"
    # Pagination: on the page or not, ranks in the whole list.
    assert effects(4)["pagination"][:3] == ("kept", 1, 1)
    assert effects(1)["pagination"][0] == "removed" and effects(1)["pagination"][2] == -1
    # Filters shift the items below a removed one up; that is not a move.
    assert effects(5)["category_cap"][0] == "kept"


async def test_explain_reports_ranks_on_later_pages_in_the_whole_list() -> None:
    c = candidates([0.9, 0.8, 0.7, 0.6], k=2, offset=2, explain=True)
    got = await Chain([]).rank(c)
    assert got.page.tolist() == [2, 3]
    page_effects = {i: got.explanations[i][-1] for i in range(4)}
    assert [(e.effect, e.rank_before, e.rank_after) for e in page_effects.values()] == [
        ("removed", 0, -1),
        ("removed", 1, -1),
        ("kept", 2, 2),
        ("kept", 3, 3),
    ]
