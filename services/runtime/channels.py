"""Client channels with the defaults every caller in the mesh should have.

Created once per process and reused: a deadline on every call (the caller's budget),
retries on UNAVAILABLE through the gRPC service config, tracing propagation.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from services.runtime.rpc_tracing import TracedChannel

# Retry only what is safe: UNAVAILABLE means the call did not reach a server's handler.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.01s",
                "maxBackoff": "0.2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", json.dumps(DEFAULT_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def open_channel(target: str, *, traced: bool = True) -> grpc.aio.Channel:
    channel = grpc.aio.insecure_channel(target, options=channel_options())
    # A TracedChannel stands in for the channel it wraps (stubs, close, channel_ready).
    return TracedChannel(channel) if traced else channel  # type: ignore[return-value]
