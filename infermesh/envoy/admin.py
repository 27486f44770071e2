"""The process-wide parts of the bootstrap: admin API, overload manager, runtime layers."""

from __future__ import annotations

from infermesh.envoy.common import EXTENSIONS_TYPE, Json, socket_address
from infermesh.envoy.tracing import Tracing, flush_runtime_layer

MAX_DOWNSTREAM_CONNECTIONS = 50000


def admin(port: int) -> Json:
    """The admin API, on loopback only (`/clusters` shows each replica's health)."""
    return {"address": socket_address("127.0.0.1", port)}


def overload_manager() -> Json:
    # Without a cap Envoy warns at start-up and accepts connections until it runs out
    # of file descriptors.
    return {
        "resource_monitors": [
            {
                "name": "envoy.resource_monitors.global_downstream_max_connections",
                "typed_config": {
                    "@type": f"{EXTENSIONS_TYPE}.resource_monitors.downstream_connections.v3."
                    "DownstreamConnectionsConfig",
                    "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                },
            }
        ]
    }


def layered_runtime(tracing: Tracing | None) -> Json:
    # The admin layer, last so it wins: operators can change runtime keys without a restart
    # (e.g. switch the edge rate limit to shadow mode) through the loopback-only admin API.
    layers: list[Json] = [{"name": "admin", "admin_layer": {}}]
    if tracing is not None:
        layers.insert(0, flush_runtime_layer(tracing))
    return {"layers": layers}
