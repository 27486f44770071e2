"""The run file of a local mesh: which processes `infermesh up` runs, for tools that attach.

<data dir>/processes.json is written when the mesh is up and rewritten whenever a replica
is started again, and removed when the mesh stops. `infermesh profile` reads it to find
every replica's pid; a pid that is no longer alive is left out on reading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

RUN_FILE = "processes.json"


@dataclass(frozen=True)
class MeshProcess:
    name: str  # e.g. scoring-1, envoy, redis
    role: str  # the service (or envoy / redis)
    pid: int
    python: bool  # a Python process py-spy can sample


@dataclass(frozen=True)
class RunFile:
    edge: str
    processes: tuple[MeshProcess, ...]


def write_processes(data_dir: Path, edge: str, processes: Sequence[MeshProcess]) -> None:
    path = data_dir / RUN_FILE
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"edge": edge, "processes": [asdict(p) for p in processes]}, indent=2))
    scratch.replace(path)  # readers never see half a file


def remove_processes(data_dir: Path) -> None:
    (data_dir / RUN_FILE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_processes(data_dir: Path) -> RunFile:
    path = data_dir / RUN_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"no mesh is running from {data_dir}/ ({path} not found): start one with `infermesh up`") from None
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot read {path}: {error}") from None
    processes = tuple(MeshProcess(**p) for p in document.get("processes", []))
    alive = tuple(p for p in processes if _alive(p.pid))
    if not alive:
        raise SystemExit(f"{path} lists no live process: is the mesh still running?")
    return RunFile(document["edge"], alive)
