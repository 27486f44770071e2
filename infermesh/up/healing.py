"""When `infermesh up` starts a replica again after it exits, and when it gives up.

Like a Kubernetes pod with restartPolicy Always: every exit (a crash, a clean exit, SIGKILL)
is followed by a restart after a back-off that doubles from `first_delay` up to `max_delay`,
so a replica that dies at once does not spin the CPU. A replica that ran for `reset_after`
seconds before exiting starts again from the first delay: it was healthy, this is a new
fault. One that is still exiting after `max_restarts` restarts within `window` seconds is
crash-looping: the mesh stops with a message naming it, as a broken configuration would
otherwise restart forever and hide the cause.

Pure bookkeeping over a clock (tests pass a fake one); infermesh.up.supervisor acts on it.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 0.5
    max_delay: float = 10.0
    reset_after: float = 30.0  # seconds a replica ran before exiting that reset the back-off
    max_restarts: int = 5  # within `window` seconds; one more exit stops the mesh
    window: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError(f"need 0 < first_delay <= max_delay, got {self.first_delay} and {self.max_delay}")
        if self.max_restarts < 0 or self.window <= 0:
            raise ValueError(f"need max_restarts >= 0 and window > 0, got {self.max_restarts} and {self.window}")


@dataclass(frozen=True)
class Restart:
    delay: float  # seconds to wait before starting the replica again
    restarts: int  # how many times it will have been restarted, this one included


@dataclass(frozen=True)
class CrashLoop:
    restarts: int  # restarts within the window before this exit
    window: float


def describe_exit(returncode: int) -> str:
    """'exited with code 1', 'killed by SIGKILL' (Popen's negative return code is the signal)."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass
class _Replica:
    started_at: float
    next_delay: float
    restarts: int = 0
    recent: deque[float] = field(default_factory=deque)  # when each restart was decided
    last_exit: str | None = None


class Healer:
    """The restart history of every replica, and the decision on each exit."""

    def __init__(self, policy: RestartPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or RestartPolicy()
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def started(self, name: str) -> None:
        """Replica `name` was (re)started now."""
        replica = self._replicas.get(name)
        if replica is None:
            self._replicas[name] = _Replica(self._clock(), self.policy.first_delay)
        else:
            replica.started_at = self._clock()

    def exited(self, name: str, returncode: int) -> Restart | CrashLoop:
        now = self._clock()
        replica = self._replicas.setdefault(name, _Replica(now, self.policy.first_delay))
        replica.last_exit = describe_exit(returncode)
        while replica.recent and now - replica.recent[0] > self.policy.window:
            replica.recent.popleft()
        if len(replica.recent) >= self.policy.max_restarts:
            return CrashLoop(len(replica.recent), self.policy.window)
        if now - replica.started_at >= self.policy.reset_after:
            replica.next_delay = self.policy.first_delay
        delay = replica.next_delay
        replica.next_delay = min(self.policy.max_delay, delay * 2)
        replica.restarts += 1
        replica.recent.append(now)
        return Restart(delay, replica.restarts)

    def restarts(self, name: str) -> int:
        replica = self._replicas.get(name)
        return replica.restarts if replica else 0

    def last_exit(self, name: str) -> str | None:
        replica = self._replicas.get(name)
        return replica.last_exit if replica else None
