"""Who called: the identity the edge vouches for, on the request's span and log lines.

Envoy's edge removes both headers from every incoming request, then sets one once the
caller has proved who it is: the API key's client name, or the verified JWT's subject
(infermesh/envoy/edge_policy.py). A request without either came unauthenticated.
"""

from __future__ import annotations

import grpc
import structlog
from opentelemetry import trace

CLIENT_ID_HEADER = "x-infermesh-client"
SUBJECT_HEADER = "x-infermesh-subject"
# Span attributes: OpenTelemetry's end-user id for the token's subject.
SUBJECT_ATTRIBUTE = "enduser.id"
CLIENT_ATTRIBUTE = "infermesh.client"
# Log fields, bound for the rest of the request (its `rpc` line included).
SUBJECT_FIELD = "subject"
CLIENT_FIELD = "client"
# A subject comes from a verified token, but its length is the issuer's choice.
MAX_IDENTITY_CHARS = 256

_FIELDS = {SUBJECT_HEADER: (SUBJECT_FIELD, SUBJECT_ATTRIBUTE), CLIENT_ID_HEADER: (CLIENT_FIELD, CLIENT_ATTRIBUTE)}


def record_caller(context: grpc.aio.ServicerContext) -> None:
    """Put the caller's identity, if the edge set one, on the current span and bind it to
    this request's log lines (the context of the request's own task)."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        names = _FIELDS.get(key)
        if names is not None and isinstance(value, str) and value:
            found[names[0]] = value[:MAX_IDENTITY_CHARS]
            trace.get_current_span().set_attribute(names[1], found[names[0]])
    if found:
        structlog.contextvars.bind_contextvars(**found)
