"""Settings from environment variables with a per-service prefix.

Each service declares a frozen dataclass; field `port` of the `features` service is read
from FEATURES_PORT, and so on. Unknown or malformed values fail at start with a message
naming the variable, never later on the request path.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class SettingsError(ValueError):
    pass


def _convert(raw: str, kind: Any, variable: str) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        kind = kinds[0]
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind in (int, float, str):
            return kind(raw)
    except ValueError as exc:
        raise SettingsError(f"{variable}={raw!r}: {exc}") from None
    raise SettingsError(f"{variable}: unsupported setting type {kind!r}")


def load_settings(cls: type[T], prefix: str, environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from `{PREFIX}_{FIELD}` variables, keeping the dataclass defaults."""
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        variable = f"{prefix.upper()}_{field.name.upper()}"
        if variable in env:
            values[field.name] = _convert(env[variable], hints[field.name], variable)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """What every service's server shares; embedded by prefix (e.g. SCORING_PORT)."""

    host: str = "127.0.0.1"
    port: int = 50051
    # How long health stays NOT_SERVING before the server stops accepting calls, so load
    # balancers stop routing first (set it above the health-check interval in a cluster).
    drain_seconds: float = 0.0
    # In-flight calls get this long to finish after the server stops accepting new ones.
    grace_seconds: float = 10.0
    # How often readiness is re-checked and published on the health service.
    readiness_interval_seconds: float = 1.0
    max_message_bytes: int = 16 * 1024 * 1024
    # Prometheus /metrics port; 0 turns the endpoint off.
    metrics_port: int = 0
    # How each response returns its trace id (x-trace-id): "trailing" metadata (free),
    # "initial" metadata (also an HTTP header for REST clients behind Envoy; one more
    # write per call) or "none".
    trace_id_metadata: str = "trailing"
