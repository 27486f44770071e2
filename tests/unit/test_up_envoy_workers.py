"""`infermesh up --envoy-workers`: how many worker threads the mesh's Envoy runs (its
--concurrency). Nothing is started: the command the supervisor would spawn is captured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infermesh.cli import build_parser
from infermesh.up.lanes import bulk_lane
from infermesh.up.supervisor import Mesh
from services.runtime.topology import local_topology

DESCRIPTOR = Path("/nonexistent/descriptor.binpb")


def envoy_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> dict[str, list[str]]:
    """Each Envoy's command line (the online one, and the bulk lane's), by process name."""
    ports = iter(range(42000, 42100))
    mesh = Mesh(
        topology=local_topology(descriptor_set=DESCRIPTOR),
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:1/0",
        model_repository=tmp_path / "models",
        log_dir=tmp_path / "logs",
        bulk=bulk_lane(DESCRIPTOR, ports.__next__, nice=19),
        **options,
    )
    spawned: dict[str, list[str]] = {}
    monkeypatch.setattr(mesh, "_spawn", lambda role, name, argv, env: spawned.setdefault(name, argv))
    mesh.start_envoy()
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
