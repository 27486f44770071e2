"""Bounds on a Recommend request, checked before the pipeline does any work.

Every field a caller controls has a limit (the ids' lengths GATEWAY_MAX_ID_LENGTH, the
candidates' count GATEWAY_MAX_CANDIDATES, k GATEWAY_MAX_K; retrieval and offset within
the candidates' count); a request past one is refused with INVALID_ARGUMENT (HTTP 400
through the edge) whose message names the field and the limit and never quotes the
value. Whether a request makes sense (a user id at all, candidates or retrieval) is the
pipeline's to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.runtime.errors import InvalidArgument
from services.runtime.limits import DEFAULT_MAX_ID_LENGTH, check_length, check_lengths


@dataclass(frozen=True)
class RequestLimits:
    max_id_length: int = DEFAULT_MAX_ID_LENGTH
    max_candidates: int = 1000
    max_k: int = 1000


def check_recommend(request: gateway_pb2.RecommendRequest, limits: RequestLimits) -> list[str]:
    """Raise InvalidArgument for the first field of `request` past its limit; else return
    the candidate ids as a list, read from the message once (check_lengths)."""
    check_length("user_id", request.user_id, limits.max_id_length)
    count = len(request.candidate_ids)
    if count > limits.max_candidates:
        raise InvalidArgument(f"candidate_ids has {count} items; at most {limits.max_candidates}")
    candidate_ids = check_lengths("candidate_ids", request.candidate_ids, limits.max_id_length)
    if request.HasField("k") and not 1 <= request.k <= limits.max_k:
        raise InvalidArgument(f"k must be between 1 and {limits.max_k}, got {request.k}")
    if request.retrieve_candidates > limits.max_candidates:
        raise InvalidArgument(f"retrieve_candidates is {request.retrieve_candidates}; at most {limits.max_candidates}")
    if request.offset > limits.max_candidates:
        raise InvalidArgument(f"offset is {request.offset}; at most {limits.max_candidates}")
    return candidate_ids
