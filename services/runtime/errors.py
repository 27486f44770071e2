"""Domain errors and the one table that maps them to gRPC status codes.

Service code raises these; the error interceptor turns them into statuses, so no servicer
calls context.abort with a code of its own choosing.
"""

from __future__ import annotations

import grpc


class InfermeshError(Exception):
    """Base of every error a client should see with its message."""


class InvalidArgument(InfermeshError):
    pass


class NotFound(InfermeshError):
    pass


class Overloaded(InfermeshError):
    pass


class Unavailable(InfermeshError):
    pass


class DeadlineExceeded(InfermeshError):
    pass


class FailedPrecondition(InfermeshError):
    pass


STATUS_FOR_ERROR: dict[type[InfermeshError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


# What a caller is told of a failure that is not a domain error (the details go to the log).
INTERNAL_ERROR_MESSAGE = "internal error; the service log has the details"


def status_for(error: InfermeshError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[kind]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


# A downstream call's status, seen by a caller: which domain error it becomes.
ERROR_FOR_STATUS: dict[grpc.StatusCode, type[InfermeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def from_rpc_error(stage: str, error: grpc.aio.AioRpcError) -> InfermeshError:
    """Re-raise a downstream failure as ours, naming the stage that failed."""
    kind = ERROR_FOR_STATUS.get(error.code(), Unavailable)
    return kind(f"{stage}: {error.details() or error.code().name}")
