"""`infermesh status`: the processes of a running `infermesh up`, from its run file.

    infermesh status                      # the mesh of ./.infermesh (or $INFERMESH_DATA_DIR)
    infermesh status --data-dir DIR --json

One line per process: its pid, whether it is alive, its address, how many times the
supervisor restarted it and how it last exited. A replica shown as not alive is waiting
for its restart (its pid is the one that exited). Exits 1 when no mesh runs from the
data dir (no run file, or the supervisor that wrote it is gone).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict

from infermesh.cli_help import CommandParser
from infermesh.settings import add_data_dir_argument
from infermesh.up.runfile import RunFile, alive, read_run_file

COLUMNS = ("NAME", "ROLE", "PID", "ALIVE", "ADDRESS", "RESTARTS", "LAST EXIT")


def rows(run: RunFile) -> list[tuple[str, ...]]:
    return [
        (
            p.name,
            p.role,
            str(p.pid),
            "yes" if alive(p.pid) else "no",
            p.address or "-",
            str(p.restarts),
            p.last_exit or "-",
        )
        for p in run.processes
    ]


def format_table(run: RunFile) -> str:
    table = [COLUMNS, *rows(run)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in table
    )


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh status", description=__doc__.splitlines()[0])
    add_data_dir_argument(parser, "the mesh's data dir, as given to `up`")
    parser.add_argument("--json", action="store_true", help="print the run file, each process with `alive` added")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = read_run_file(args.data_dir)
    supervisor_alive = run.supervisor is None or alive(run.supervisor)
    if args.json:
        document = {
            "edge": run.edge,
            "supervisor": run.supervisor,
            "supervisor_alive": supervisor_alive,
            "processes": [{**asdict(p), "alive": alive(p.pid)} for p in run.processes],
        }
        print(json.dumps(document, indent=2))
    else:
        state = "running" if supervisor_alive else "NOT running: the run file is stale"
        print(f"mesh from {args.data_dir.resolve()}: edge {run.edge}, supervisor pid {run.supervisor} ({state})")
        print(format_table(run))
    return 0 if supervisor_alive else 1
