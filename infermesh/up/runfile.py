"""The run file of a local mesh: which processes `infermesh up` runs, for tools that attach.

<data dir>/processes.json is written when the mesh is up, rewritten whenever a replica
exits or is started again (with its restart count and how it last exited), and removed
when the mesh stops. `infermesh profile` reads it to find every replica's pid (a pid that
is no longer alive is left out on reading); `infermesh status` shows all of it.
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
    address: str | None = None  # a replica's gRPC address, host:port
    restarts: int = 0  # times the supervisor started it again
    last_exit: str | None = None  # e.g. "killed by SIGKILL", "exited with code 1"


@dataclass(frozen=True)
class RunFile:
    edge: str
    processes: tuple[MeshProcess, ...]
    supervisor: int | None = None  # pid of the process that runs the mesh (`infermesh up`)


def write_processes(data_dir: Path, edge: str, processes: Sequence[MeshProcess], supervisor: int | None = None) -> None:
    path = data_dir / RUN_FILE
    scratch = path.with_suffix(".tmp")
    document = {"edge": edge, "supervisor": supervisor, "processes": [asdict(p) for p in processes]}
    scratch.write_text(json.dumps(document, indent=2))
    scratch.replace(path)  # readers never see half a file


def remove_processes(data_dir: Path) -> None:
    (data_dir / RUN_FILE).unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_run_file(data_dir: Path) -> RunFile:
    """Everything the run file lists, live or not."""
    path = data_dir / RUN_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"no mesh is running from {data_dir}/ ({path} not found): start one with `infermesh up`"
        ) from None
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot read {path}: {error}") from None
    try:
        processes = tuple(MeshProcess(**p) for p in document.get("processes", []))
        return RunFile(document["edge"], processes, document.get("supervisor"))
    except (AttributeError, KeyError, TypeError):  # JSON, but not what `infermesh up` writes
        raise SystemExit(
            f"{path} is not a run file of `infermesh up` (edited or from another version): "
            "stop the mesh if one runs from it, delete the file and start the mesh again"
        ) from None


def read_processes(data_dir: Path) -> RunFile:
    """The live processes of the run file; none alive is an error."""
    run = read_run_file(data_dir)
    live = tuple(p for p in run.processes if alive(p.pid))
    if not live:
        raise SystemExit(f"{data_dir / RUN_FILE} lists no live process: is the mesh still running?")
    return RunFile(run.edge, live, run.supervisor)
