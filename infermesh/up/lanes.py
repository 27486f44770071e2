"""The bulk lane of a local mesh: where the jobs' traffic runs, below the online traffic.

A job's workers keep the mesh busy for minutes; through the same replicas, every online
request would queue behind their calls (measured: online p99 x3-4 with a job running).
So `infermesh up --workers N` also starts a second set of the pipeline's replicas
(gateway, features, scoring, ranking, as many of each as online) behind an Envoy of their own, and the
workers call that Envoy. Every process of the lane, workers included, runs at the lowest
CPU priority Linux has: the SCHED_IDLE policy (`chrt --idle`: a runnable online process
takes the core from it at once), and nice 19 where `chrt` is missing. While online
requests want the cores they get them; the lane takes whatever they leave, which with a
light online load is almost all of it.

Both only weigh against processes of the same scheduling group: where the kernel groups
processes by session (autogroup, the default on many distributions), a process in a
session of its own competes as a whole group, whatever its priority inside it. So the
supervisor starts every replica in its own session's group (a process group of its own,
for Ctrl-C, not a session). On Kubernetes the same split is two Deployments per service
with different CPU requests (cgroup weights); docs/jobs.md says how.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.runtime.topology import BACKENDS, FEATURES, GATEWAY, RANKING, SCORING, Endpoint, MeshTopology

BULK = "bulk"
# The services a request passes through: the lane has one replica of each.
PIPELINE: tuple[str, ...] = (GATEWAY, FEATURES, SCORING, RANKING)
# 19: the least CPU share nice gives (weight 15 against 1024 for nice 0); used where
# SCHED_IDLE is not (no `chrt`), and 0 turns the lane's lower priority off.
DEFAULT_BULK_NICE = 19


@dataclass(frozen=True)
class BulkLane:
    """The lane's own topology (its Envoy's edge, internal listeners and replicas) and
    the nice value of its processes."""

    topology: MeshTopology
    nice: int = DEFAULT_BULK_NICE

    @property
    def edge(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.topology.edge_port)


def bulk_lane(
    descriptor_set: Path,
    port: Callable[[], int],
    nice: int = DEFAULT_BULK_NICE,
    replicas: Mapping[str, int] | None = None,
) -> BulkLane:
    """A lane with `replicas` of each pipeline service (default one; `infermesh up` gives it
    the online mesh's counts, so a job runs as fast as the cores it is left allow), every
    port from `port()` (free ports: nobody dials the lane but the workers, which are told
    where it is)."""
    if not 0 <= nice <= 19:
        raise ValueError(f"the bulk lane's nice value must be 0..19, got {nice}")
    counts = {service: (replicas or {}).get(service, 1) for service in PIPELINE}
    topology = MeshTopology(
        replicas={
            service: tuple(Endpoint("127.0.0.1", port()) for _ in range(count)) for service, count in counts.items()
        },
        descriptor_set=descriptor_set,
        edge_port=port(),
        admin_port=port(),
        internal_ports={backend: port() for backend in BACKENDS},
    )
    return BulkLane(topology, nice)


def replica_name(service: str, index: int, lane: str = "") -> str:
    """scoring-1 online; scoring-bulk-0 in the bulk lane."""
    return f"{service}-{lane}-{index}" if lane else f"{service}-{index}"


def lowered(argv: list[str], nice: int) -> list[str]:
    """argv run below the online processes from its first instruction on (every thread it
    starts inherits the policy): SCHED_IDLE, and nice `nice`; as it is when `nice` is 0."""
    if nice == 0:
        return argv
    prefix = []
    if (renice := shutil.which("nice")) is not None:
        prefix += [renice, "-n", str(nice)]
    if (chrt := shutil.which("chrt")) is not None:
        prefix += [chrt, "--idle", "0"]
    return [*prefix, *argv]
