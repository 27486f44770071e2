import grpc
import pytest

from gateway.pipeline import PipelineConfig, validate
from services.runtime.errors import InvalidArgument, NotFound, Overloaded, Unavailable, from_rpc_error, status_for


def test_error_table() -> None:
    assert status_for(InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_downstream_errors_keep_their_meaning_and_name_the_stage() -> None:
    error = from_rpc_error("features", FakeRpcError(grpc.StatusCode.NOT_FOUND, "unknown user 'u1'"))
    assert isinstance(error, NotFound) and str(error) == "features: unknown user 'u1'"
    assert isinstance(from_rpc_error("scoring", FakeRpcError(grpc.StatusCode.UNKNOWN, "boom")), Unavailable)


@pytest.mark.parametrize(
    ("user", "candidates", "k", "message"),
    [
        ("", ["i1"], 5, "user_id is required"),
        ("u1", [], 5, "at least one item"),
        ("u1", ["i1"] * 1001, 5, "at most 1000 candidate_ids"),
        ("u1", ["i1"], 0, "between 1 and 1000"),
        ("u1", ["i1"], 1001, "between 1 and 1000"),
    ],
)
def test_recommend_validation(user: str, candidates: list[str], k: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate(PipelineConfig(), user, candidates, k)


def test_k_defaults_when_absent() -> None:
    assert validate(PipelineConfig(default_k=20), "u1", ["i1"], None) == 20


def test_event_loop_choice() -> None:
    import asyncio

    import uvloop

    from services.runtime.event_loop import event_loop_runner

    assert event_loop_runner({}) is uvloop.run  # the default where installed
    assert event_loop_runner({"INFERMESH_EVENT_LOOP": "uvloop"}) is uvloop.run
    assert event_loop_runner({"INFERMESH_EVENT_LOOP": "asyncio"}) is asyncio.run
    with pytest.raises(SystemExit, match="INFERMESH_EVENT_LOOP='trio': use one of uvloop, asyncio"):
        event_loop_runner({"INFERMESH_EVENT_LOOP": "trio"})
