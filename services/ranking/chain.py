"""The ranking chain: configurable, vectorised stages over one ordered candidate list.

A request's candidates start as one list ("order"): rankable items (item_present = 1) by
score, highest first, ties by position in the request, NaN scores last. Each configured
stage (RANKING_CHAIN) takes that list, as int indices into the request, and returns the
next one:

* seen_filter: drops what the user has seen (a Redis set, services/ranking/seen.py);
* rules: drops items of denied categories and scores outside [min, max];
* calibration: rewrites scores with a monotone map (order stands: see Calibration);
* category_cap: keeps at most max_per_category items of each category (the request's);
* mmr: re-orders the head of the list for diversity (maximal marginal relevance).

Pagination then cuts the page (offset, k) out of the final list. A stage runs only when it
applies to the request (seen_filter needs a user id, mmr embeddings and a lambda below 1,
...). A stage that applies but cannot run (Redis down) raises StageSkipped: the chain goes
on without it and reports it, the request never fails for it.

Every stage is numpy over the whole list; nothing loops over items in Python except the
explanations, which are built only when a request asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from services.ranking.rank import capped, initial_order
from services.ranking.seen import SeenStore, StageSkipped
from services.runtime.errors import InvalidArgument
from services.runtime.telemetry import ATTR_ITEMS, SPAN_RANKING_PREFIX, stage_span

SEEN_FILTER = "seen_filter"
RULES = "rules"
CALIBRATION = "calibration"
CATEGORY_CAP = "category_cap"
MMR = "mmr"
STAGE_NAMES = (SEEN_FILTER, RULES, CALIBRATION, CATEGORY_CAP, MMR)
# Not configurable: the first and last step of every chain (names used in explanations).
ORDER = "order"
PAGINATION = "pagination"

REMOVED, MOVED, KEPT = "removed", "moved", "kept"
_EFFECTS = (REMOVED, MOVED, KEPT)


@dataclass(eq=False)
class Candidates:
    """One request's items and parameters, every array indexed by position in the request."""

    item_ids: Sequence[str]
    scores: np.ndarray  # float32 [n]; calibration replaces the array (never writes into it)
    categories: np.ndarray  # int32 [n]
    present: np.ndarray  # bool [n]
    embeddings: np.ndarray | None = None  # float32 [n, dim]
    user_id: str = ""
    max_per_category: int = 0
    k: int = 10
    offset: int = 0
    explain: bool = False
    time_remaining: float | None = None  # seconds left of the caller's deadline
    # The user's seen flags (bool [n]) or why they could not be read, when a batch read them
    # for all its requests at once (Chain.prefetch); None: seen_filter reads them itself.
    seen: np.ndarray | StageSkipped | None = None

    @property
    def n(self) -> int:
        return len(self.scores)


@dataclass(frozen=True, eq=False)
class Outcome:
    order: np.ndarray  # int64 request indices, best first
    note: Any = None  # whatever the stage's details() needs later


class Stage:
    name: str = ""
    # Whether the stage can read Candidates.embeddings: when no stage of the chain does,
    # ranking tells its callers they need not send them (RankResponse.item_embeddings_unused).
    reads_embeddings: bool = False

    def applies(self, c: Candidates, order: np.ndarray) -> bool:
        return True

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        raise NotImplementedError

    async def prefetch(self, batch: Sequence[Candidates]) -> None:
        """Reads for a whole batch of requests at once, before each is ranked; none by default."""

    def details(self, c: Candidates, note: Any, items: np.ndarray, removed: np.ndarray) -> list[str]:
        """A reason per item of `items` (request indices), for explanations only."""
        return [""] * len(items)


class Effect(NamedTuple):
    stage: str
    effect: str  # removed | moved | kept
    rank_before: int
    rank_after: int  # -1: removed
    detail: str


@dataclass(frozen=True, eq=False)
class Ranked:
    page: np.ndarray  # request indices of the page, best first
    total: int  # items in the whole ranked list
    scores: np.ndarray  # float32 [n], as the last stage left them (calibrated)
    skipped: list[str]
    explanations: list[list[Effect]] | None  # per request item, when asked for


# ----------------------------------------------------------------------------- ordering


def paginate(order: np.ndarray, offset: int, k: int) -> np.ndarray:
    total = len(order)
    if offset and offset >= total:
        if total == 0:
            raise InvalidArgument(
                f"offset {offset} is beyond the ranked list: it is empty (every candidate was "
                "filtered out or absent); ask with offset 0"
            )
        raise InvalidArgument(
            f"offset {offset} is beyond the ranked list of {total} items (after filtering); "
            f"the last page starts below offset {total}"
        )
    return order[offset : offset + k]


# ----------------------------------------------------------------------------- stages


class SeenFilter(Stage):
    """Drops the items in the user's seen set (one Redis read for the whole request: seen.py)."""

    name = SEEN_FILTER

    def __init__(self, store: SeenStore) -> None:
        self.store = store

    def applies(self, c: Candidates, order: np.ndarray) -> bool:
        return bool(c.user_id)

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        # All request ids, not just the survivors: the repeated field goes to Redis as it is,
        # with no per-item Python to pick the survivors out.
        seen = c.seen if c.seen is not None else await self.store.seen(c.user_id, c.item_ids, c.time_remaining)
        if isinstance(seen, StageSkipped):
            raise seen
        return Outcome(order[~seen[order]])

    async def prefetch(self, batch: Sequence[Candidates]) -> None:
        """Every user's flags in one Redis round trip; each request then filters as alone."""
        asking = [c for c in batch if c.user_id and c.n]
        if asking:
            # One batch, one deadline: every request of it has the same time remaining.
            found = await self.store.seen_many([(c.user_id, c.item_ids) for c in asking], asking[0].time_remaining)
            for c, seen in zip(asking, found, strict=True):
                c.seen = seen

    def details(self, c: Candidates, note: Any, items: np.ndarray, removed: np.ndarray) -> list[str]:
        reason = f"seen by user {c.user_id}"
        return [reason if r else "" for r in removed.tolist()]


class Rules(Stage):
    """Business rules on item attributes: denied categories, score bounds.

    The bounds apply to the score as it is at this point of the chain (raw before
    calibration, calibrated after it). A NaN score fails a minimum.
    """

    name = RULES

    def __init__(
        self,
        deny_categories: Sequence[int] = (),
        min_score: float = -np.inf,
        max_score: float = np.inf,
    ) -> None:
        self.deny = np.asarray(sorted(set(deny_categories)), dtype=np.int32)
        self.min_score = float(min_score)
        self.max_score = float(max_score)

    def applies(self, c: Candidates, order: np.ndarray) -> bool:
        return bool(self.deny.size) or self.min_score > -np.inf or self.max_score < np.inf

    def _violations(self, scores: np.ndarray, categories: np.ndarray) -> tuple[np.ndarray, ...]:
        denied = np.isin(categories, self.deny)
        with np.errstate(invalid="ignore"):
            low = ~(scores >= self.min_score) if self.min_score > -np.inf else np.zeros(len(scores), bool)
            high = scores > self.max_score
        return denied, low, high

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        denied, low, high = self._violations(c.scores[order], c.categories[order])
        # The scores as this stage saw them (calibration later replaces, never mutates, them).
        return Outcome(order[~(denied | low | high)], note=c.scores)

    def details(self, c: Candidates, note: Any, items: np.ndarray, removed: np.ndarray) -> list[str]:
        scores, categories = note[items], c.categories[items]
        denied, low, high = self._violations(scores, categories)
        out = []
        for r, d, lo, _hi, s, cat in zip(
            removed.tolist(),
            denied.tolist(),
            low.tolist(),
            high.tolist(),
            scores.tolist(),
            categories.tolist(),
            strict=False,
        ):
            if not r:
                out.append("")
            elif d:
                out.append(f"category {cat} is denied (RANKING_RULES_DENY_CATEGORIES)")
            elif lo:
                out.append(f"score {s:.6g} is below the minimum {self.min_score:g} (RANKING_RULES_MIN_SCORE)")
            else:
                out.append(f"score {s:.6g} is above the maximum {self.max_score:g} (RANKING_RULES_MAX_SCORE)")
        return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |x|, and still strictly increasing.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_PROBABILITY_EPS = 1e-7


def platt(a: float, b: float, score_kind: str = "probability") -> Callable[[np.ndarray], np.ndarray]:
    """sigmoid(a * z + b), z = logit(score) for probability scores, the score itself for
    logits. Temperature scaling is a = 1 / T, b = 0. Strictly increasing for a > 0."""
    if a <= 0:
        raise ValueError(f"the Platt slope a must be > 0 to keep the order, got {a}")

    def calibrate(scores: np.ndarray) -> np.ndarray:
        z = scores
        if score_kind == "probability":
            p = np.clip(scores, _PROBABILITY_EPS, 1.0 - _PROBABILITY_EPS)
            z = np.log(p) - np.log1p(-p)
        return _sigmoid(a * z + b)

    return calibrate


def piecewise_linear(xs: Sequence[float], ys: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """Linear interpolation through (xs, ys), flat beyond the ends. Non-decreasing: xs must
    increase strictly and ys must not decrease."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if len(x) < 2 or len(x) != len(y):
        raise ValueError("a piecewise-linear map needs at least two x:y points")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("piecewise-linear points must be finite")
    if np.any(np.diff(x) <= 0):
        raise ValueError("piecewise-linear x values must increase strictly")
    if np.any(np.diff(y) < 0):
        raise ValueError("piecewise-linear y values must not decrease (the map must be monotone)")
    return lambda scores: np.interp(scores, x, y)


class Calibration(Stage):
    """Maps scores through a monotone (non-decreasing) function.

    It never re-orders: where the map makes two scores equal (a flat piece, float32
    rounding) the items keep the order their uncalibrated scores gave them. Returned
    scores are the calibrated ones; NaN stays NaN.
    """

    name = CALIBRATION

    def __init__(self, function: Callable[[np.ndarray], np.ndarray] | None, label: str) -> None:
        self.function = function
        self.label = label

    def applies(self, c: Candidates, order: np.ndarray) -> bool:
        return self.function is not None

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        assert self.function is not None
        before = c.scores
        after = before.copy()
        after[order] = self.function(before[order].astype(np.float64)).astype(np.float32)
        c.scores = after
        return Outcome(order, note=(before, after))

    def details(self, c: Candidates, note: Any, items: np.ndarray, removed: np.ndarray) -> list[str]:
        before, after = note
        return [
            f"score {b:.6g} -> {a:.6g} ({self.label})"
            for b, a in zip(before[items].tolist(), after[items].tolist(), strict=False)
        ]


class CategoryCap(Stage):
    """At most the request's max_per_category items of one category (0: no cap)."""

    name = CATEGORY_CAP

    def applies(self, c: Candidates, order: np.ndarray) -> bool:
        return c.max_per_category > 0

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        return Outcome(capped(order, c.categories, c.max_per_category))

    def details(self, c: Candidates, note: Any, items: np.ndarray, removed: np.ndarray) -> list[str]:
        cap = c.max_per_category
        return [
            f"category {cat} already has {cap} items ranked above" if r else ""
            for r, cat in zip(removed.tolist(), c.categories[items].tolist(), strict=False)
        ]


def mmr_select(embeddings: np.ndarray, scores: np.ndarray, lam: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximal marginal relevance over N candidates (rows, best-ranked first).

    Each step picks argmax(lam * relevance - (1 - lam) * max cosine similarity to the items
    picked so far); relevance is the score min-max scaled to [0, 1] over the candidates, so
    lambda means the same whatever the score's scale. Ties go to the better-ranked row.
    One numpy step per pick over all N, never a loop over pairs.
    Returns (row indices in pick order, each pick's max cosine to the earlier picks; NaN
    for the first).
    """
    n = len(scores)
    count = min(count, n)
    picks = np.empty(count, dtype=np.int64)
    closeness = np.full(count, np.nan)
    if count == 0:
        return picks, closeness
    similarity = _cosine_similarity(embeddings)
    # A picked row's gain becomes -inf, so it never wins again (no mask per step).
    gain = lam * _relevance(scores)
    weight = 1.0 - lam
    first = int(gain.argmax())
    picks[0] = first
    gain[first] = -np.inf
    nearest = similarity[first].copy()  # each row's max similarity to the picks so far
    objective = np.empty(n)
    for step in range(1, count):
        np.multiply(nearest, -weight, out=objective)
        objective += gain
        chosen = int(objective.argmax())
        picks[step], closeness[step] = chosen, nearest[chosen]
        gain[chosen] = -np.inf
        np.maximum(nearest, similarity[chosen], out=nearest)
    return picks, closeness


def _cosine_similarity(embeddings: np.ndarray) -> np.ndarray:
    """[N, N] cosine similarity of the rows (float64); non-finite values count as 0."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    if not np.isfinite(vectors).all():
        vectors = np.nan_to_num(vectors, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)  # zero vectors: similar to nothing
    return (unit @ unit.T).astype(np.float64)


def _relevance(scores: np.ndarray) -> np.ndarray:
    """Scores min-max scaled to [0, 1] over the finite ones; +inf is 1, NaN and -inf are 0."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if finite.all():
        lo, hi = s.min(), s.max()
        return (s - lo) / (hi - lo) if hi > lo else np.ones(len(s))
    relevance = np.where(s == np.inf, 1.0, 0.0)  # NaN / -inf: least relevant
    if finite.any():
        lo, hi = s[finite].min(), s[finite].max()
        relevance[finite] = (s[finite] - lo) / (hi - lo) if hi > lo else 1.0
    return relevance


class Mmr(Stage):
    """Diversity: re-orders the first `top_n` items of the list by greedy MMR.

    Only as many picks as the page needs (offset + k): greedy MMR's picks do not depend on
    how many follow, so every page cut from the same list agrees with the others. The
    items of the first `top_n` not picked follow the picks in their previous order, then
    the rest of the list. lambda 1 is pure relevance (the stage does not run).
    """

    name = MMR

    def __init__(self, lam: float, top_n: int) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"MMR lambda must be within [0, 1], got {lam}")
        if top_n < 1:
            raise ValueError(f"MMR top_n must be >= 1, got {top_n}")
        self.lam = float(lam)
        self.top_n = int(top_n)
        self.reads_embeddings = self.lam < 1.0  # lambda 1: the stage never runs

    def applies(self, c: Candidates, order: np.ndarray) -> bool:
        return self.reads_embeddings and c.embeddings is not None and len(order) > 1

    async def run(self, c: Candidates, order: np.ndarray) -> Outcome:
        assert c.embeddings is not None
        head = order[: self.top_n]
        picks, closeness = mmr_select(c.embeddings[head], c.scores[head], self.lam, c.offset + c.k)
        taken = np.zeros(len(head), dtype=bool)
        taken[picks] = True
        new_order = np.concatenate([head[picks], head[~taken], order[self.top_n :]])
        return Outcome(new_order, note=(head, picks, closeness))

    def details(self, c: Candidates, note: Any, items: np.ndarray, removed: np.ndarray) -> list[str]:
        head, picks, closeness = note
        pick_step = np.full(c.n, -1, dtype=np.int64)
        pick_step[head[picks]] = np.arange(len(picks))
        in_head = np.zeros(c.n, dtype=bool)
        in_head[head] = True
        nearest = np.full(c.n, np.nan)
        nearest[head[picks]] = closeness
        out = []
        for step, inside, near in zip(
            pick_step[items].tolist(), in_head[items].tolist(), nearest[items].tolist(), strict=False
        ):
            if step == 0:
                out.append(f"picked first by MMR (lambda {self.lam:g}): the most relevant")
            elif step > 0:
                out.append(f"picked {step + 1} by MMR (lambda {self.lam:g}): max cosine {near:.3f} to the items above")
            elif inside:
                out.append(f"not picked by MMR for this page: follows the {len(picks)} picks")
            else:
                out.append(f"beyond the first {self.top_n} items MMR re-orders (RANKING_MMR_TOP_N)")
        return out


# ----------------------------------------------------------------------------- chain


@dataclass(frozen=True, eq=False)
class _Record:
    """One step of the chain, kept to explain it: the list before and after it."""

    stage: str
    before: np.ndarray
    after: np.ndarray
    details: Callable[[np.ndarray, np.ndarray], list[str]]
    rank_after: np.ndarray | None = None  # reported ranks of `after`, when not positions


class Chain:
    def __init__(
        self,
        stages: Sequence[Stage],
        on_skip: Callable[[str, StageSkipped], None] | None = None,
    ) -> None:
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage appears twice in the chain: {names}")
        self.stages = tuple(stages)
        self._on_skip = on_skip
        # Whether any stage can read the requests' item embeddings: fixed with the stages.
        self.reads_embeddings = any(stage.reads_embeddings for stage in self.stages)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    async def prefetch(self, batch: Sequence[Candidates]) -> None:
        """Before a batch's requests are ranked one by one: each stage's reads for all at once."""
        for stage in self.stages:
            await stage.prefetch(batch)

    async def rank(self, c: Candidates) -> Ranked:
        if c.k <= 0:
            raise InvalidArgument(f"k must be positive, got {c.k}")
        order = initial_order(c.scores, c.present)
        records: list[_Record] | None = None
        if c.explain:
            records = [self._order_record(c, order)]
        skipped: list[str] = []
        for stage in self.stages:
            if not len(order) or not stage.applies(c, order):
                continue
            with stage_span(SPAN_RANKING_PREFIX, stage.name, {ATTR_ITEMS: len(order)}):
                try:
                    outcome = await stage.run(c, order)
                except StageSkipped as skip:
                    skipped.append(stage.name)
                    if self._on_skip is not None:
                        self._on_skip(stage.name, skip)
                    continue
            if records is not None:
                details = _bind(stage, c, outcome.note)
                records.append(_Record(stage.name, order, outcome.order, details))
            order = outcome.order
        page = paginate(order, c.offset, c.k)
        explanations = None
        if records is not None:
            records.append(self._page_record(c, order, page))
            explanations = explain(c.n, records)
        return Ranked(page, len(order), c.scores, skipped, explanations)

    @staticmethod
    def _order_record(c: Candidates, order: np.ndarray) -> _Record:
        raw = c.scores

        def details(items: np.ndarray, removed: np.ndarray) -> list[str]:
            return [
                "not rankable: item_present is 0 (no features)" if r else f"score {s:.6g}"
                for r, s in zip(removed.tolist(), raw[items].tolist(), strict=False)
            ]

        return _Record(ORDER, np.arange(c.n), order, details)

    @staticmethod
    def _page_record(c: Candidates, order: np.ndarray, page: np.ndarray) -> _Record:
        on_page = f"on the page (offset {c.offset}, k {c.k})"
        off_page = f"outside the page (offset {c.offset}, k {c.k})"

        def details(items: np.ndarray, removed: np.ndarray) -> list[str]:
            return [off_page if r else on_page for r in removed.tolist()]

        # Ranks stay positions in the whole list: item 23 of the list is 23 on page 2 too.
        return _Record(PAGINATION, order, page, details, rank_after=c.offset + np.arange(len(page)))


def _bind(stage: Stage, c: Candidates, note: Any) -> Callable[[np.ndarray, np.ndarray], list[str]]:
    return lambda items, removed: stage.details(c, note, items, removed)


def explain(n: int, records: Sequence[_Record]) -> list[list[Effect]]:
    """Per request item, what each step did to it: ranks vectorised, then one Effect each."""
    per_item: list[list[Effect]] = [[] for _ in range(n)]
    for record in records:
        before, after = record.before, record.after
        position_before = np.full(n, -1, dtype=np.int64)
        position_before[before] = np.arange(len(before))
        position_after = np.full(n, -1, dtype=np.int64)
        position_after[after] = np.arange(len(after))
        # A filter moves everyone below a removed item up one place; only a change of place
        # among the items that survive the step counts as "moved".
        survives = position_after[before] >= 0
        among_survivors = np.full(n, -1, dtype=np.int64)
        among_survivors[before[survives]] = np.arange(int(survives.sum()))
        reported_after = position_after
        if record.rank_after is not None:
            reported_after = np.full(n, -1, dtype=np.int64)
            reported_after[after] = record.rank_after
        items = np.sort(before)
        removed = position_after[items] < 0
        moved = ~removed & (among_survivors[items] != position_after[items])
        codes = np.where(removed, 0, np.where(moved, 1, 2))
        details = record.details(items, removed)
        for item, code, rank_before, rank_after, detail in zip(
            items.tolist(),
            codes.tolist(),
            position_before[items].tolist(),
            reported_after[items].tolist(),
            details,
            strict=False,
        ):
            per_item[item].append(Effect(record.stage, _EFFECTS[code], rank_before, rank_after, detail))
    return per_item
