"""Ranking's wire decoding, and top-k by score with a per-category cap, vectorised (no
per-item Python). The service runs the configurable chain in chain.py; top_k is that
chain's result for a request with no user id, embeddings or extra stages configured, and
what the gateway's fallback and the tests compare against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class RankInput:
    scores: np.ndarray  # float32 [n]
    categories: np.ndarray  # int32 [n]
    present: np.ndarray  # bool [n]


def decode(n: int, scores: bytes, categories: bytes, present: bytes) -> RankInput:
    """View the wire bytes as arrays, checking each length against the item count."""
    expected = {"scores": (scores, "<f4"), "item_categories": (categories, "<i4")}
    arrays = {}
    for field, (raw, dtype) in expected.items():
        width = np.dtype(dtype).itemsize
        if len(raw) != n * width:
            raise InvalidArgument(f"{field} has {len(raw)} bytes; {n} items need {n * width} ({dtype} each)")
        arrays[field] = np.frombuffer(raw, dtype=dtype)
    if present and len(present) != n:
        raise InvalidArgument(f"item_present has {len(present)} bytes; {n} items need {n}")
    mask = np.frombuffer(present, dtype=np.uint8).astype(bool) if present else np.ones(n, dtype=bool)
    return RankInput(arrays["scores"], arrays["item_categories"], mask)


def decode_embeddings(n: int, raw: bytes, dim: int) -> np.ndarray | None:
    """View item_embeddings as float32 [n, dim]; None when absent (MMR then does not run)."""
    if not raw:
        return None
    if dim <= 0:
        raise InvalidArgument(
            f"item_embeddings has {len(raw)} bytes but embedding_dim is {dim}; set embedding_dim "
            "to the number of float32 values per item"
        )
    expected = n * dim * 4
    if len(raw) != expected:
        raise InvalidArgument(
            f"item_embeddings has {len(raw)} bytes; {n} items x embedding_dim {dim} need {expected} "
            "(float32 each, row-major, in item_ids order)"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(n, dim)


def occurrence_within_group(groups: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same group value."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_lengths = np.diff(np.r_[starts, len(groups)])
    within_sorted = np.arange(len(groups)) - np.repeat(starts, run_lengths)
    within = np.empty(len(groups), dtype=np.int64)
    within[order] = within_sorted
    return within


def initial_order(scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rankable items by score descending, ties by request position, NaN last."""
    candidates = np.flatnonzero(present)
    keys = np.nan_to_num(scores[candidates].astype(np.float64), nan=-np.inf)
    # lexsort: last key is primary -> by descending score, then ascending position.
    return candidates[np.lexsort((candidates, -keys))]


def capped(order: np.ndarray, categories: np.ndarray, max_per_category: int) -> np.ndarray:
    """`order` keeping at most max_per_category items of each category (0: no cap)."""
    if max_per_category <= 0 or not len(order):
        return order
    return order[occurrence_within_group(categories[order]) < max_per_category]


def top_k(ranked: RankInput, k: int, max_per_category: int) -> np.ndarray:
    """Indices of the chosen items, best first.

    Ties in score break by position in the request, so the same input ranks the same way.
    NaN scores rank last.
    """
    if k <= 0:
        raise InvalidArgument(f"k must be positive, got {k}")
    return capped(initial_order(ranked.scores, ranked.present), ranked.categories, max_per_category)[:k]
