"""What the gateway serves when a stage fails: scores without the model, ranking without
the ranking service. Vectorised numpy over the bytes the stages exchange, no per-item Python.

The row layout comes from the feature service's contract: GetFeaturesResponse.model_input
holds rows [user vector, item vector] of the pipeline file's fallback vectors, and
user_columns says how many leading columns are the user's. The gateway knows nothing else
of how features are stored.

Fallback scores follow the pipeline file's `fallback`: `dot_product` takes the user-item
dot product of those rows, at hand with no extra lookup (in the demo, the main term of the
reference workload's ground-truth affinity, which makes it a reasonable stand-in for the
model); sigmoid(dot / sqrt(dim)) keeps the scores in (0, 1) like the model's. `neutral`
gives every item its neutral_score.

Fallback ranking: top-k by score with the per-category cap and pagination, the gateway's
own few lines rather than the ranking service's chain (which it stands in for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.genproto.infermesh.features.v1 import features_pb2
from services.genproto.infermesh.ranking.v1 import ranking_pb2
from services.runtime.pipeline import FallbackSpec

# The pipeline file's defaults, for a pipeline that leaves `fallback` out.
_DEFAULT_FALLBACK = FallbackSpec()
# model_name of a response whose scores came from fallback_scores, not from a model.
FALLBACK_MODEL_NAME = _DEFAULT_FALLBACK.model_name
# What every item scores when the rows give nothing to compute from.
NEUTRAL_SCORE = _DEFAULT_FALLBACK.neutral_score


@dataclass(frozen=True)
class FeatureMatrix:
    """The model input as float32 [rows, user_columns + item_columns]."""

    rows: np.ndarray
    user_columns: int

    @property
    def item_columns(self) -> int:
        return self.rows.shape[1] - self.user_columns

    @property
    def items(self) -> np.ndarray:
        """float32 [rows, item_columns]: each row's item half."""
        return self.rows[:, self.user_columns :]


def feature_matrix(features: features_pb2.GetFeaturesResponse) -> FeatureMatrix | None:
    """The response's model input with its layout, or None when the response does not state
    a layout of user then item columns (or its bytes do not fill the matrix)."""
    matrix = features.model_input
    if not 0 < features.user_columns < matrix.columns:
        return None
    data = matrix.data  # a copy of the field's bytes on every read: read once
    if len(data) != matrix.rows * matrix.columns * 4:
        return None
    rows = np.frombuffer(data, dtype="<f4").reshape(matrix.rows, matrix.columns)
    return FeatureMatrix(rows, features.user_columns)


def item_embeddings(matrix: FeatureMatrix | None) -> bytes:
    """The item half of each row, row-major float32 bytes (what ranking's MMR compares)."""
    if matrix is None:
        return b""
    return np.ascontiguousarray(matrix.items).tobytes()


def fallback_scores(matrix: FeatureMatrix | None, rows: int, neutral: float = NEUTRAL_SCORE) -> np.ndarray:
    """float32 [rows]: sigmoid(user . item / sqrt(dim)); `neutral` for all when there are no
    vectors or the user and item halves differ in width (no dot product to take)."""
    if matrix is None or rows == 0 or matrix.user_columns != matrix.item_columns:
        return np.full(rows, neutral, dtype="<f4")
    user = matrix.rows[0, : matrix.user_columns]  # every row holds the same user vector
    dots = matrix.items @ user / np.float32(np.sqrt(matrix.user_columns))
    return (1.0 / (1.0 + np.exp(-dots.astype(np.float64)))).astype("<f4")


def best_first(scores: np.ndarray, rankable: np.ndarray) -> np.ndarray:
    """Positions of the rankable items by score descending, ties by position, NaN last."""
    positions = np.flatnonzero(rankable)
    keys = np.nan_to_num(scores[positions].astype(np.float64), nan=-np.inf)
    # lexsort: the last key is the primary one.
    return positions[np.lexsort((positions, -keys))]


def capped_per_category(order: np.ndarray, categories: np.ndarray, max_per_category: int) -> np.ndarray:
    """`order` keeping the first max_per_category items of each category (0: no cap)."""
    if max_per_category <= 0 or not len(order):
        return order
    listed = categories[order]
    by_category = np.argsort(listed, kind="stable")  # stable: list order within a category
    sorted_categories = listed[by_category]
    starts = np.flatnonzero(np.r_[True, sorted_categories[1:] != sorted_categories[:-1]])
    run_lengths = np.diff(np.r_[starts, len(order)])
    place_in_category = np.empty(len(order), dtype=np.int64)
    place_in_category[by_category] = np.arange(len(order)) - np.repeat(starts, run_lengths)
    return order[place_in_category < max_per_category]


def fallback_rank(
    item_ids: list[str],
    scores: np.ndarray,
    categories: bytes,
    present: bytes,
    k: int,
    offset: int,
    max_per_category: int,
) -> ranking_pb2.RankResponse:
    """Top-k by score with the category cap and pagination: what ranking would answer
    without its filters, calibration and diversity stages."""
    n = len(item_ids)
    category_array = np.frombuffer(categories, dtype="<i4") if len(categories) == 4 * n else np.zeros(n, "<i4")
    mask = np.frombuffer(present, dtype=np.uint8).astype(bool) if len(present) == n else np.ones(n, bool)
    order = capped_per_category(best_first(scores, mask), category_array, max_per_category)
    page = order[offset : offset + k]
    return ranking_pb2.RankResponse(
        items=[
            ranking_pb2.RankedItem(item_id=item_ids[i], score=s, category=c)
            for i, s, c in zip(page.tolist(), scores[page].tolist(), category_array[page].tolist(), strict=True)
        ],
        total_items=len(order),
    )
