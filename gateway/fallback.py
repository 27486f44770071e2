"""What the gateway serves when a stage fails: scores without the model, ranking without
the ranking service. Vectorised numpy over the bytes the stages exchange, no per-item Python.

Fallback scores: the feature rows are [user_vec, item_vec] (services/features/layout.py), so
the user-item dot product is at hand with no extra lookup; it is the main term of the
reference workload's ground-truth affinity, which makes it a reasonable stand-in for the
model. sigmoid(dot / sqrt(dim)) keeps the scores in (0, 1) like the model's.
"""

from __future__ import annotations

import numpy as np
from services.genproto.infermesh.ranking.v1 import ranking_pb2

from services.features.layout import FEATURE_DIM, MODEL_INPUT_DIM
from services.ranking.rank import capped, initial_order

# model_name of a response whose scores came from fallback_scores, not from a model.
FALLBACK_MODEL_NAME = "fallback-dot-product"


def feature_rows(data: bytes, rows: int, columns: int) -> np.ndarray | None:
    """The model input as float32 [rows, columns], or None if it is not the reference layout."""
    if columns != MODEL_INPUT_DIM or len(data) != rows * columns * 4:
        return None
    return np.frombuffer(data, dtype="<f4").reshape(rows, columns)


def item_embeddings(matrix: np.ndarray | None) -> bytes:
    """The item half of each row, row-major float32 bytes (what ranking's MMR compares)."""
    if matrix is None:
        return b""
    return np.ascontiguousarray(matrix[:, FEATURE_DIM:]).tobytes()


def fallback_scores(matrix: np.ndarray | None, rows: int) -> np.ndarray:
    """float32 [rows]: sigmoid(user . item / sqrt(dim)); 0.5 for all when the layout is unknown."""
    if matrix is None or rows == 0:
        return np.full(rows, 0.5, dtype="<f4")
    user = matrix[0, :FEATURE_DIM]  # every row holds the same user vector
    dots = matrix[:, FEATURE_DIM:] @ user / np.float32(np.sqrt(FEATURE_DIM))
    return (1.0 / (1.0 + np.exp(-dots.astype(np.float64)))).astype("<f4")


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
    order = capped(initial_order(scores, mask), category_array, max_per_category)
    page = order[offset : offset + k]
    return ranking_pb2.RankResponse(
        items=[
            ranking_pb2.RankedItem(item_id=item_ids[i], score=s, category=c)
            for i, s, c in zip(page.tolist(), scores[page].tolist(), category_array[page].tolist(), strict=True)
        ],
        total_items=len(order),
    )
