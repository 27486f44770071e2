"""Domain errors and the one table that maps them to gRPC status codes, both ways.

Service code raises these; the error interceptor (services/runtime/server.py) turns them
into statuses, so no servicer calls context.abort with a code of its own choosing. A caller
of another service reads the table backwards (from_rpc_error), so a downstream status keeps
its meaning through the gateway: OUT_OF_RANGE stays a client error, never UNAVAILABLE,
which Envoy and the clients would retry.

Every status the services and the gateway raise or act on is in the table;
tests/unit/test_errors.py walks their sources to keep it so.
"""

from __future__ import annotations

import grpc
from google.rpc import status_pb2

from services.runtime.logs import get_logger

log = get_logger(__name__)


class InfermeshError(Exception):
    """Base of every error a client should see with its message."""


class InvalidArgument(InfermeshError):
    pass


class OutOfRange(InfermeshError):
    """A value of the right type past the end of what exists (e.g. a page beyond the list)."""


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


class PermissionDenied(InfermeshError):
    """The caller proved who it is (a client certificate), but that identity is not let in."""


class Internal(InfermeshError):
    """The service failed in a way no retry or other request fixes (a bug, a broken model)."""


# The one table. One status per error and one error per status, so it reads both ways.
STATUS_FOR_ERROR: dict[type[InfermeshError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Internal: grpc.StatusCode.INTERNAL,
}
# A downstream call's status, seen by a caller: which domain error it becomes.
ERROR_FOR_STATUS: dict[grpc.StatusCode, type[InfermeshError]] = {
    status: error for error, status in STATUS_FOR_ERROR.items()
}
# The same statuses over HTTP, for the services' own HTTP endpoints (scoring's Open
# Inference Protocol over REST): what Envoy's gRPC-JSON transcoder answers REST clients of
# the gateway for each code (docs/rest.md), so an error reads alike on every path.
HTTP_STATUS_FOR_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# What a caller is told of a failure that is not a domain error (the details go to the log).
INTERNAL_ERROR_MESSAGE = "internal error; the service log has the details"


def status_for(error: InfermeshError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[kind]
    return grpc.StatusCode.INTERNAL


def http_status_for(error: InfermeshError) -> int:
    """The HTTP status of a domain error: its gRPC status through HTTP_STATUS_FOR_STATUS."""
    return HTTP_STATUS_FOR_STATUS.get(status_for(error), 500)


# The most UTF-8 bytes of a status message; percent-encoded in grpc-message, it stays
# under 3 KiB, well inside gRPC's 8 KiB for all metadata.
MAX_DETAILS_BYTES = 1024
_TRUNCATED = "... (truncated)"


def bounded_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes (on a character boundary), marked as cut: what
    a status may say, whether it ends a call or stands for one request in a batch reply."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return message
    return encoded[: limit - len(_TRUNCATED)].decode("utf-8", "ignore") + _TRUNCATED


def rpc_status(outcome: Exception | None, method: str = "") -> status_pb2.Status:
    """One request's outcome as the google.rpc.Status a batch reply carries for it: what the
    interceptor (services/runtime/server.py) would have answered the request alone. OK for
    None; a domain error through the table; anything else INTERNAL with the generic message,
    its details logged, never sent."""
    if outcome is None:
        return status_pb2.Status()
    if isinstance(outcome, InfermeshError):
        return status_pb2.Status(code=status_for(outcome).value[0], message=bounded_details(str(outcome)))
    log.error("unhandled error", grpc_method=method, exc_info=outcome)
    return status_pb2.Status(code=grpc.StatusCode.INTERNAL.value[0], message=INTERNAL_ERROR_MESSAGE)


def from_rpc_error(stage: str, error: grpc.aio.AioRpcError) -> InfermeshError:
    """Re-raise a downstream failure as ours, naming the stage that failed. A status no
    service of ours raises (UNKNOWN, CANCELLED, UNIMPLEMENTED...) reads as Unavailable."""
    kind = ERROR_FOR_STATUS.get(error.code(), Unavailable)
    return kind(f"{stage}: {error.details() or error.code().name}")
