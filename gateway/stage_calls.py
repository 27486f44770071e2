"""How the pipeline calls its three stages: one request per call, or coalesced.

DirectCalls sends each request's call on its own. CoalescedCalls puts a Coalescer
(gateway/coalescing.py) in front of each stage, with the batched contracts:
GetFeaturesBatch and RankBatch (a google.rpc.Status per request), and for scoring one
Open Inference Protocol request whose rows are the requests' rows, concatenated as the
bytes they arrived in; its scores are split back by row counts.

Both raise what a direct call raises (grpc.aio.AioRpcError), so the pipeline's failure
policy is the same either way: a per-request status from a batch becomes that request's
AioRpcError, and a request that ran out of time waiting to join gets DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
from google.rpc import status_pb2

from gateway.coalescing import Coalescer
from services.genproto.inference import grpc_predict_v2_pb2 as inference_pb2
from services.genproto.infermesh.features.v1 import features_pb2
from services.genproto.infermesh.ranking.v1 import ranking_pb2

_STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
# What a stage answers when the request is at fault, not the stage or the server: the
# pipeline fails the request rather than falling back, and a refused scoring batch is
# retried request by request.
REQUEST_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})

FeaturesReply = features_pb2.GetFeaturesResponse
ScoresReply = inference_pb2.ModelInferResponse
RankReply = ranking_pb2.RankResponse


class StageStubs(Protocol):
    features: object
    scoring: object
    ranking: object


class StageCalls(Protocol):
    async def features(self, request: features_pb2.GetFeaturesRequest, timeout: float) -> FeaturesReply: ...
    async def score(self, request: inference_pb2.ModelInferRequest, timeout: float) -> ScoresReply: ...
    async def rank(self, request: ranking_pb2.RankRequest, timeout: float) -> RankReply: ...


class DirectCalls:
    """One call per request and stage."""

    def __init__(self, stubs: StageStubs) -> None:
        self._stubs = stubs

    async def features(self, request: features_pb2.GetFeaturesRequest, timeout: float) -> FeaturesReply:
        return await self._stubs.features.GetFeatures(request, timeout=timeout)  # type: ignore[attr-defined]

    async def score(self, request: inference_pb2.ModelInferRequest, timeout: float) -> ScoresReply:
        return await self._stubs.scoring.ModelInfer(request, timeout=timeout)  # type: ignore[attr-defined]

    async def rank(self, request: ranking_pb2.RankRequest, timeout: float) -> RankReply:
        return await self._stubs.ranking.Rank(request, timeout=timeout)  # type: ignore[attr-defined]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _own_result(status: status_pb2.Status, value: object) -> object:
    if status.code == 0:
        return value
    return rpc_error(_STATUS_BY_CODE.get(status.code, grpc.StatusCode.INTERNAL), status.message)


class CoalescedCalls:
    """Each stage's calls from concurrent requests sent as one call (gateway/coalescing.py)."""

    def __init__(
        self,
        stubs: StageStubs,
        *,
        max_batch: int,
        max_in_flight: int,
        max_rows: int,
        max_wait: float = 0.05,
        observe_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self._stubs = stubs
        self._max_rows = max_rows
        self._direct = DirectCalls(stubs)
        self._options = {
            "max_batch": max_batch,
            "max_in_flight": max_in_flight,
            "max_wait": max_wait,
            "observe_batch": observe_batch,
        }
        self._features = Coalescer("features", self._direct.features, self._features_batch, **self._options)
        self._ranking = Coalescer("ranking", self._direct.rank, self._rank_batch, **self._options)
        # Only requests for the same model version and input layout can share rows.
        self._scoring: dict[tuple[object, ...], Coalescer] = {}

    async def features(self, request: features_pb2.GetFeaturesRequest, timeout: float) -> FeaturesReply:
        return await _joined(self._features, request, timeout)

    async def rank(self, request: ranking_pb2.RankRequest, timeout: float) -> RankReply:
        return await _joined(self._ranking, request, timeout)

    async def score(self, request: inference_pb2.ModelInferRequest, timeout: float) -> ScoresReply:
        key = (request.model_name, request.model_version, input_layout(request))
        coalescer = self._scoring.get(key)
        if coalescer is None:
            coalescer = self._scoring[key] = Coalescer(
                "scoring",
                self._direct.score,
                self._score_batch,
                size=request_rows,
                max_size=self._max_rows,
                **self._options,
            )
        return await _joined(coalescer, request, timeout)

    async def _features_batch(self, requests: Sequence[features_pb2.GetFeaturesRequest], timeout: float) -> list:
        reply = await self._stubs.features.GetFeaturesBatch(  # type: ignore[attr-defined]
            features_pb2.GetFeaturesBatchRequest(requests=requests), timeout=timeout
        )
        return [_own_result(r.status, r.features) for r in reply.results]

    async def _rank_batch(self, requests: Sequence[ranking_pb2.RankRequest], timeout: float) -> list:
        reply = await self._stubs.ranking.RankBatch(  # type: ignore[attr-defined]
            ranking_pb2.RankBatchRequest(requests=requests), timeout=timeout
        )
        return [_own_result(r.status, r.response) for r in reply.results]

    async def _score_batch(self, requests: Sequence[inference_pb2.ModelInferRequest], timeout: float) -> list:
        combined, rows = concatenate_rows(requests)
        try:
            reply = await self._stubs.scoring.ModelInfer(combined, timeout=timeout)  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as error:
            if error.code() not in REQUEST_ERRORS:
                raise
            # The model refused the rows together (one bad request, or more rows than its
            # max_batch_size): each request alone, so only a bad one fails.
            return await asyncio.gather(*(self._direct.score(r, timeout) for r in requests), return_exceptions=True)
        return split_scores(reply, rows)


def request_rows(request: inference_pb2.ModelInferRequest) -> int:
    return request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1


def input_layout(request: inference_pb2.ModelInferRequest) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """Each input's name, datatype and row shape: requests that agree on it can share a call."""
    return tuple((t.name, t.datatype, tuple(t.shape[1:])) for t in request.inputs)


async def _joined(coalescer: Coalescer, request: object, timeout: float) -> object:
    try:
        return await coalescer.call(request, timeout)
    except TimeoutError:
        raise rpc_error(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"{coalescer.stage}: deadline passed waiting for a batch"
        ) from None


def concatenate_rows(
    requests: Sequence[inference_pb2.ModelInferRequest],
) -> tuple[inference_pb2.ModelInferRequest, list[int]]:
    """One request whose inputs' rows are every request's rows in order, input by input
    (bytes joined, not decoded); the requests share one input layout (input_layout)."""
    first = requests[0]
    rows = [request_rows(r) for r in requests]
    combined = inference_pb2.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    for i, tensor in enumerate(first.inputs):
        combined.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[sum(rows), *tensor.shape[1:]])
        combined.raw_input_contents.append(b"".join(r.raw_input_contents[i] for r in requests))
    combined.outputs.extend(first.outputs)
    return combined, rows


def split_scores(reply: inference_pb2.ModelInferResponse, rows: Sequence[int]) -> list[object]:
    """The batched reply cut back into one reply per request, by its row count."""
    total = sum(rows)
    raw = reply.raw_output_contents[0] if reply.raw_output_contents else b""
    if not reply.outputs or total == 0 or len(raw) % total:
        error = rpc_error(grpc.StatusCode.INTERNAL, f"scoring: {len(raw)} bytes of output for {total} rows")
        return [error] * len(rows)
    width = len(raw) // total
    output = reply.outputs[0]
    replies: list[object] = []
    start = 0
    for count in rows:
        end = start + count * width
        one = inference_pb2.ModelInferResponse(
            model_name=reply.model_name, model_version=reply.model_version, id=reply.id
        )
        one.outputs.add(name=output.name, datatype=output.datatype, shape=[count, *output.shape[1:]])
        one.raw_output_contents.append(raw[start:end])
        replies.append(one)
        start = end
    return replies
