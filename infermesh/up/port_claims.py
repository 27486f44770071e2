"""Port ranges claimed by every process of this user on this machine, so that two of them
never hand out the same free port.

Each process draws the ports its children will bind at random from the same ranges
(infermesh/up/supervisor.py, _PortPicker) and checks that they are free, but a port stays
free until the child binds it: two `infermesh up`s started together, or a test session and
the meshes it starts, could each pick it (seen: a bulk-lane Envoy failed "cannot bind ...
Address already in use"). A claim is a line in one small JSON file, read and written under
an exclusive lock; it lasts until released, until it expires (by then the child has bound
the port, and a bound port is never free) or until its process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from infermesh.up.runfile import alive

# [start, stop, pid, until (time.time())]
Claim = list[float]


def default_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(runtime) / f"infermesh-{os.getuid()}-port-claims.json"


class PortClaims:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()

    def claim(self, ports: range, seconds: float) -> bool:
        """Claim `ports` for `seconds`; False if another live process holds any of them. Where
        the file cannot be used (a read-only temp dir), every claim succeeds: the caller's own
        checks are all there is, as before claims."""
        try:
            with self._claims() as claims:
                if any(
                    ports.start < stop and start < ports.stop for start, stop, pid, _ in claims if pid != os.getpid()
                ):
                    return False
                claims.append([ports.start, ports.stop, os.getpid(), time.time() + seconds])
                return True
        except OSError:
            return True

    def release(self, ports: range) -> None:
        with contextlib.suppress(OSError), self._claims() as claims:
            mine = [ports.start, ports.stop, os.getpid()]
            claims[:] = [c for c in claims if c[:3] != mine]

    @contextlib.contextmanager
    def _claims(self) -> Iterator[list[Claim]]:
        """The live claims, under the lock; what the block leaves in the list is written back."""
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "r+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
            try:
                stored = json.loads(file.read() or "[]")
            except ValueError:
                stored = []  # a file cut short (a process killed mid-write): start over
            now = time.time()
            claims = [c for c in stored if _valid(c) and c[3] > now and alive(int(c[2]))]
            yield claims
            file.seek(0)
            file.truncate()
            file.write(json.dumps(claims))


def _valid(claim: object) -> bool:
    return isinstance(claim, list) and len(claim) == 4 and all(isinstance(v, int | float) for v in claim)
