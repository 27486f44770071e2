"""Bounds on what a request may carry, and on what an error may say back.

Every service checks the length of the ids it is sent (GATEWAY_/FEATURES_/RANKING_
MAX_ID_LENGTH) before any work, with INVALID_ARGUMENT naming the field and the limit.
Error messages quote a caller's value only through `echo`, which shortens it, and the
server interceptor sends every status message through `bounded_details`, so no request can
make a status bigger than gRPC's metadata limit (8 KiB by default: beyond it the caller
saw RESOURCE_EXHAUSTED or UNAVAILABLE, which Envoy even retried).
"""

from __future__ import annotations

from collections.abc import Iterable

from services.runtime.errors import InvalidArgument

# Longest id (user, item, entity) a request may carry: far above any real key, far below
# what would make a message, a log line or a Redis key unwieldy.
DEFAULT_MAX_ID_LENGTH = 256
# How much of a caller's value an error message quotes.
ECHO_CHARS = 64
# The most UTF-8 bytes of a status message; percent-encoded in grpc-message, it stays
# under 3 KiB, well inside gRPC's 8 KiB for all metadata.
MAX_DETAILS_BYTES = 1024
_TRUNCATED = "... (truncated)"


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


def lengths_error(field: str, values: Iterable[str], limit: int) -> InvalidArgument | None:
    """The error of the first of `values` longer than `limit` characters, named by index."""
    for index, value in enumerate(values):
        if len(value) > limit:
            return InvalidArgument(f"{field}[{index}] is {len(value)} characters; at most {limit}")
    return None


def check_length(field: str, value: str, limit: int) -> None:
    error = length_error(field, value, limit)
    if error is not None:
        raise error


def check_lengths(field: str, values: Iterable[str], limit: int) -> None:
    error = lengths_error(field, values, limit)
    if error is not None:
        raise error


def bounded_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`message` cut to `limit` UTF-8 bytes (on a character boundary), marked as cut."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return message
    return encoded[: limit - len(_TRUNCATED)].decode("utf-8", "ignore") + _TRUNCATED
