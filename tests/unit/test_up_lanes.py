"""The bulk lane's plan (infermesh.up.lanes): ports, names, priority, and the environment
the supervisor gives its replicas and workers; the worker threads of the mesh's Envoys
(`--envoy-workers`). Nothing is started here; tests/e2e/test_jobs.py
runs `infermesh up --workers 1` and checks the lane serves the job at its priority."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from infermesh.cli import build_parser
from infermesh.up import lanes
from infermesh.up.lanes import BULK, PIPELINE, bulk_lane, lowered, replica_name
from infermesh.up.supervisor import Mesh
from services.runtime.topology import BACKENDS, GATEWAY, JOBS, local_topology

DESCRIPTOR = Path("/nonexistent/descriptor.binpb")


def ports(start: int = 41000) -> itertools.count[int]:
    return itertools.count(start)


def test_the_lane_has_one_replica_of_each_pipeline_service_on_ports_of_its_own() -> None:
    lane = bulk_lane(DESCRIPTOR, ports().__next__, nice=19)
    topology = lane.topology
    assert tuple(topology.replicas) == PIPELINE and JOBS not in topology.replicas
    assert all(len(endpoints) == 1 for endpoints in topology.replicas.values())
    assert set(topology.internal_ports) == set(BACKENDS)
    used = [topology.edge_port, topology.admin_port, *topology.internal_ports.values()]
    used += [e.port for endpoints in topology.replicas.values() for e in endpoints]
    assert len(set(used)) == len(used)
    assert not topology.http_replicas  # no Open Inference Protocol over HTTP: only workers call it
    assert lane.edge.address == f"127.0.0.1:{topology.edge_port}"


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_nice_value_outside_0_to_19_is_refused(nice: int) -> None:
    with pytest.raises(ValueError, match="0..19"):
        bulk_lane(DESCRIPTOR, ports().__next__, nice=nice)


def test_replica_names_say_the_lane() -> None:
    assert replica_name("scoring", 1) == "scoring-1"
    assert replica_name("scoring", 0, BULK) == "scoring-bulk-0"


def test_lowered_runs_the_command_below_the_online_ones_from_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanes.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert lowered(["python", "-m", "gateway"], 19) == [
        "/usr/bin/nice", "-n", "19", "/usr/bin/chrt", "--idle", "0", "python", "-m", "gateway"
    ]  # fmt: skip
    assert lowered(["python"], 0) == ["python"]  # 0: the lane runs at the online priority
    monkeypatch.setattr(lanes.shutil, "which", lambda name: None if name == "chrt" else f"/usr/bin/{name}")
    assert lowered(["python"], 19) == ["/usr/bin/nice", "-n", "19", "python"]


def mesh(tmp_path: Path, **options: Any) -> Mesh:
    topology = local_topology(descriptor_set=DESCRIPTOR)
    return Mesh(
        topology=topology,
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:1/0",
        model_repository=tmp_path / "models",
        log_dir=tmp_path / "logs",
        bulk=bulk_lane(DESCRIPTOR, ports().__next__, nice=19),
        **options,
    )


def test_the_bulk_gateway_calls_the_bulk_lanes_envoy(tmp_path: Path) -> None:
    built = mesh(tmp_path)
    assert built.bulk is not None
    lane = built.bulk.topology
    env = built.service_env(GATEWAY, lane.replicas[GATEWAY][0], lane)
    for backend in BACKENDS:
        assert env[f"GATEWAY_{backend.upper()}_TARGET"] == lane.internal_endpoint(backend).address
    online = built.service_env(GATEWAY, built.topology.replicas[GATEWAY][0])
    assert online["GATEWAY_FEATURES_TARGET"] == built.topology.internal_endpoint("features").address


def test_the_lanes_ports_are_checked_with_the_meshs(tmp_path: Path) -> None:
    built = mesh(tmp_path)
    assert built.bulk is not None
    checked = {port for _, port in built._ports()}
    assert built.bulk.topology.edge_port in checked
    assert {e.port for endpoints in built.bulk.topology.replicas.values() for e in endpoints} <= checked


def test_the_lane_can_mirror_the_online_replica_counts() -> None:
    lane = bulk_lane(DESCRIPTOR, ports().__next__, 19, {"scoring": 2, "jobs": 1})
    assert {service: len(endpoints) for service, endpoints in lane.topology.replicas.items()} == {
        "gateway": 1,
        "features": 1,
        "scoring": 2,
        "ranking": 1,
    }


# `infermesh up --envoy-workers`: how many worker threads the mesh's Envoys run (their
# --concurrency). Nothing is started: the command the supervisor would spawn is captured.


def envoy_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> dict[str, list[str]]:
    """Each Envoy's command line (the online one, and the bulk lane's), by process name."""
    built = mesh(tmp_path, **options)
    spawned: dict[str, list[str]] = {}
    monkeypatch.setattr(built, "_spawn", lambda role, name, argv, env: spawned.setdefault(name, argv))
    built.start_envoy()
    return spawned


def workers(argv: list[str]) -> str | None:
    return argv[argv.index("--concurrency") + 1] if "--concurrency" in argv else None


def test_envoy_runs_one_worker_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned = envoy_commands(tmp_path, monkeypatch)
    assert set(spawned) == {"envoy", "envoy-bulk"}
    assert {name: workers(argv) for name, argv in spawned.items()} == {"envoy": "1", "envoy-bulk": "1"}


def test_envoy_runs_the_workers_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert workers(envoy_commands(tmp_path, monkeypatch, envoy_workers=3)["envoy"]) == "3"
    # None: Envoy's own default (a worker per core), no flag given.
    assert workers(envoy_commands(tmp_path, monkeypatch, envoy_workers=None)["envoy"]) is None


def test_up_takes_envoy_workers_from_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["up"]).envoy_workers == 1
    assert parser.parse_args(["up", "--envoy-workers", "4"]).envoy_workers == 4
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["up", "--envoy-workers", bad])
        assert exit_info.value.code == 2
        assert "--envoy-workers" in capsys.readouterr().err
