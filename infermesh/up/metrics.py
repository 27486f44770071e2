"""Prometheus /metrics of `infermesh up` itself: the replicas it runs and restarts.

* `infermesh_replica_restarts_total{replica,service}`: times `up` started a replica again
  after it exited (the same count as `infermesh status`).
* `infermesh_replica_up{replica,service}`: 1 while the replica's process runs.

Read from the supervisor at each scrape, on a registry of its own (nothing else of the
process is exported), on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class Supervised(Protocol):
    def replica_states(self) -> list[tuple[str, str, int, bool]]: ...  # (replica, service, restarts, alive)


class SupervisorCollector:
    def __init__(self, mesh: Supervised) -> None:
        self._mesh = mesh

    def collect(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "infermesh_replica_restarts",
            "Times infermesh up started a replica again after it exited.",
            labels=["replica", "service"],
        )
        up = GaugeMetricFamily(
            "infermesh_replica_up", "1 while the replica's process runs.", labels=["replica", "service"]
        )
        for replica, service, count, alive in self._mesh.replica_states():
            restarts.add_metric([replica, service], count)
            up.add_metric([replica, service], 1.0 if alive else 0.0)
        yield restarts
        yield up


def serve_supervisor_metrics(mesh: Supervised, port: int) -> None:
    """Serve GET /metrics on 127.0.0.1:port from a daemon thread (it ends with the process)."""
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(mesh))
    start_http_server(port, addr="127.0.0.1", registry=registry)
