"""Bounds on what a request may carry, and on what an error may say back.

Every service checks the length of the ids it is sent (GATEWAY_/FEATURES_/RANKING_
MAX_ID_LENGTH) before any work, with INVALID_ARGUMENT naming the field and the limit.
Error messages quote a caller's value only through `echo`, which shortens it, and the
server interceptor sends every status message through `bounded_details`, so no request can
make a status bigger than gRPC's metadata limit (8 KiB by default: beyond it the caller
saw RESOURCE_EXHAUSTED or UNAVAILABLE, which Envoy even retried).
"""

from __future__ import annotations

from collections.abc import Sequence

# bounded_details and its limit live with the error table (batch replies use them too).
from services.runtime.errors import MAX_DETAILS_BYTES, InvalidArgument, bounded_details  # noqa: F401

# Longest id (user, item, entity) a request may carry: far above any real key, far below
# what would make a message, a log line or a Redis key unwieldy.
DEFAULT_MAX_ID_LENGTH = 256
# How much of a caller's value an error message quotes.
ECHO_CHARS = 64


def echo(value: str, limit: int = ECHO_CHARS) -> str:
    """`value` quoted for an error message, shortened to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def length_error(field: str, value: str, limit: int) -> InvalidArgument | None:
    """The error of `value` if it is longer than `limit` characters (a batch fails it alone)."""
    if len(value) > limit:
        return InvalidArgument(f"{field} is {len(value)} characters; at most {limit}")
    return None


def lengths_error(field: str, values: Sequence[str], limit: int) -> InvalidArgument | None:
    """The error of the first of `values` longer than `limit` characters, named by index."""
    # Every request carries hundreds of ids: the common case is one pass in C, no Python loop.
    if not values or max(map(len, values)) <= limit:
        return None
    index = next(i for i, value in enumerate(values) if len(value) > limit)
    return InvalidArgument(f"{field}[{index}] is {len(values[index])} characters; at most {limit}")


def check_length(field: str, value: str, limit: int) -> None:
    error = length_error(field, value, limit)
    if error is not None:
        raise error


def check_lengths(field: str, values: Sequence[str], limit: int) -> list[str]:
    """Raise lengths_error's error; else return `values` as a list. Callers use that list from
    then on: each read of a protobuf repeated string field builds every str again (~14 us for
    200 ids), so a field checked here and read again later was decoded twice."""
    ids = values if isinstance(values, list) else list(values)
    error = lengths_error(field, ids, limit)
    if error is not None:
        raise error
    return ids
