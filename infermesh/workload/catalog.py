"""The synthetic reference catalog and its ground-truth affinity.

Everything here is a pure function of the seed, so the demo, the tests and the benchmarks
all see the same users and items and ranking quality can be measured against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.features.layout import FEATURE_DIM

DEFAULT_SEED = 7
N_USERS = 10_000
N_ITEMS = 100_000
N_CATEGORIES = 50

# Item vector = ITEM_CENTROID_W * category centroid + ITEM_NOISE_W * noise; the weights'
# squares sum to ~1 so every component stays ~N(0, 1) and the model input needs no scaling.
_ITEM_CENTROID_W = 0.75
_ITEM_NOISE_W = 0.66
# Each user leans towards one favourite category, which is what makes categories matter.
_USER_CENTROID_W = 0.6
_USER_NOISE_W = 0.8


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on ndarrays is ambiguous
class Catalog:
    user_ids: list[str]
    user_vecs: np.ndarray  # float32 [U, FEATURE_DIM]
    item_ids: list[str]
    item_vecs: np.ndarray  # float32 [I, FEATURE_DIM]
    item_category: np.ndarray  # int32 [I], 0..n_categories-1
    item_price: np.ndarray  # float32 [I], > 0
    n_categories: int
    seed: int

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only C-contiguous copy, so a shared Catalog cannot be mutated by a consumer."""
    out = np.ascontiguousarray(a)
    out.flags.writeable = False
    return out


def generate_catalog(
    seed: int = DEFAULT_SEED,
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    n_categories: int = N_CATEGORIES,
) -> Catalog:
    """Deterministic catalog: same arguments give bit-identical arrays on every machine."""
    if n_users <= 0 or n_items <= 0 or n_categories <= 0:
        raise ValueError("n_users, n_items and n_categories must be positive")
    rng = np.random.Generator(np.random.PCG64(seed))
    f32 = np.float32

    centroids = rng.standard_normal((n_categories, FEATURE_DIM), dtype=f32)

    item_category = rng.integers(0, n_categories, size=n_items, dtype=np.int32)
    item_noise = rng.standard_normal((n_items, FEATURE_DIM), dtype=f32)
    item_vecs = f32(_ITEM_CENTROID_W) * centroids[item_category] + f32(_ITEM_NOISE_W) * item_noise

    favourite = rng.integers(0, n_categories, size=n_users, dtype=np.int32)
    user_noise = rng.standard_normal((n_users, FEATURE_DIM), dtype=f32)
    user_vecs = f32(_USER_CENTROID_W) * centroids[favourite] + f32(_USER_NOISE_W) * user_noise

    # Log-normal prices around a per-category level: positive, skewed, category-dependent.
    category_log_price = rng.normal(3.0, 0.6, size=n_categories).astype(f32)
    log_price = category_log_price[item_category] + rng.normal(0.0, 0.4, size=n_items).astype(f32)
    item_price = np.round(np.exp(log_price), 2).astype(f32)
    item_price = np.maximum(item_price, f32(0.01))

    return Catalog(
        user_ids=[f"u{i}" for i in range(n_users)],
        user_vecs=_frozen(user_vecs.astype(f32, copy=False)),
        item_ids=[f"i{i}" for i in range(n_items)],
        item_vecs=_frozen(item_vecs.astype(f32, copy=False)),
        item_category=_frozen(item_category),
        item_price=_frozen(item_price),
        n_categories=n_categories,
        seed=seed,
    )


def affinity(user_vecs: np.ndarray, item_vecs: np.ndarray) -> np.ndarray:
    """Ground-truth affinity in (0, 1) for each (user row, item row) pair, broadcasting rows.

    A scaled dot product (the "taste match", dominated by the category centroids) plus a
    saturating interaction on a feature subspace, so the truth is not just bilinear but still
    smooth enough for a small ReLU MLP to learn. Depends on nothing but the two vectors.
    """
    u = np.asarray(user_vecs, dtype=np.float32)
    v = np.asarray(item_vecs, dtype=np.float32)
    if u.shape[-1] != FEATURE_DIM or v.shape[-1] != FEATURE_DIM:
        raise ValueError(f"feature vectors must have {FEATURE_DIM} columns")
    half = FEATURE_DIM // 2
    match = np.sum(u * v, axis=-1) / np.float32(np.sqrt(FEATURE_DIM))
    # Items "close" to the user in the first half of feature space get a bonus, far ones a
    # penalty; tanh keeps the term bounded so the dot product stays the main signal.
    dist2 = np.mean((u[..., :half] - v[..., :half]) ** 2, axis=-1)
    closeness = np.tanh(np.float32(1.5) - dist2)
    logit = np.float32(1.2) * match + np.float32(1.0) * closeness - np.float32(1.0)
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-logit))).astype(np.float32, copy=False)


def model_input(user_vec: np.ndarray, item_vecs: np.ndarray) -> np.ndarray:
    """Rows of [user_vec, item_vec] (float32 [N, 2*FEATURE_DIM], C-contiguous): the ranker's input."""
    u = np.asarray(user_vec, dtype=np.float32).reshape(FEATURE_DIM)
    v = np.asarray(item_vecs, dtype=np.float32).reshape(-1, FEATURE_DIM)
    out = np.empty((v.shape[0], 2 * FEATURE_DIM), dtype=np.float32)
    out[:, :FEATURE_DIM] = u
    out[:, FEATURE_DIM:] = v
    return out


def ndcg_at_k(pred_scores: np.ndarray, true_gains: np.ndarray, k: int = 20) -> float:
    """NDCG@k with linear gains; 2-D inputs are one query per row and return the mean.

    Ties in the prediction are broken by position (stable sort) so the result is deterministic.
    """
    pred = np.atleast_2d(np.asarray(pred_scores, dtype=np.float64))
    gains = np.atleast_2d(np.asarray(true_gains, dtype=np.float64))
    if pred.shape != gains.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {gains.shape}")
    if k <= 0:
        raise ValueError("k must be positive")
    k = min(k, pred.shape[1])
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    order = np.argsort(-pred, axis=1, kind="stable")[:, :k]
    dcg = np.take_along_axis(gains, order, axis=1) @ discount
    ideal = -np.sort(-gains, axis=1)[:, :k] @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        per_query = np.where(ideal > 0, dcg / ideal, 0.0)
    return float(per_query.mean())


SEEN_PER_USER = 20
# Keeps the seen-items draws off the catalog's own random stream, so adding them changed
# no user, item or model.
_SEEN_STREAM = 0x5EE7


def seen_items(seed: int, n_users: int, n_items: int, per_user: int = SEEN_PER_USER) -> np.ndarray:
    """int64 [n_users, per_user]: the items each user has already seen, distinct per row.

    A pure function of its arguments, like the catalog; what ranking's seen filter reads
    once `infermesh seed` has written it to Redis.
    """
    per_user = min(per_user, n_items)
    rng = np.random.default_rng([seed, _SEEN_STREAM])
    seen = rng.integers(0, n_items, size=(n_users, per_user), dtype=np.int64)
    # Redraw the few rows that drew an item twice (about 0.2% of them for the reference sizes).
    ordered = np.sort(seen, axis=1)
    for row in np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)).tolist():
        seen[row] = rng.choice(n_items, size=per_user, replace=False)
    return seen
