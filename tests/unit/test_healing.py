"""The restart policy of `infermesh up` (back-off, its reset, the crash-loop limit) on a fake
clock, what `infermesh status` shows of it from the run file, and Envoy's exit stopping the
mesh. (Replicas restarted and crash-looping for real: tests/e2e/test_healing_up.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from infermesh.up import status
from infermesh.up.healing import CrashLoop, Healer, Restart, RestartPolicy, describe_exit
from infermesh.up.runfile import MeshProcess, read_processes, read_run_file, write_processes
from infermesh.up.supervisor import Child, Mesh, MeshError, free_topology

KILLED = -signal.SIGKILL
DEAD_PID = 2**22 + 12345  # above pid_max's default: never a live process


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def crash_repeatedly(
    healer: Healer, clock: FakeClock, times: int, runs_for: float = 0.1, name: str = "scoring-1"
) -> list[Restart | CrashLoop]:
    """The replica runs `runs_for` seconds, exits, waits out its back-off, starts again..."""
    decisions: list[Restart | CrashLoop] = []
    for _ in range(times):
        clock.advance(runs_for)
        decision = healer.exited(name, KILLED)
        decisions.append(decision)
        if isinstance(decision, CrashLoop):
            break
        clock.advance(decision.delay)
        healer.started(name)
    return decisions


def test_the_back_off_doubles_from_half_a_second_to_its_cap() -> None:
    clock = FakeClock()
    healer = Healer(RestartPolicy(max_restarts=100), clock)
    healer.started("scoring-1")
    decisions = crash_repeatedly(healer, clock, 8)
    assert [d.delay for d in decisions if isinstance(d, Restart)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert [d.restarts for d in decisions if isinstance(d, Restart)] == list(range(1, 9))
    assert healer.restarts("scoring-1") == 8


def test_a_replica_that_ran_long_enough_starts_again_after_the_first_delay() -> None:
    clock = FakeClock()
    healer = Healer(RestartPolicy(reset_after=30), clock)
    healer.started("ranking-0")
    decisions = [healer.exited("ranking-0", 1)]
    clock.advance(0.5)
    healer.started("ranking-0")
    clock.advance(0.1)
    decisions.append(healer.exited("ranking-0", 1))
    clock.advance(1.0)
    healer.started("ranking-0")
    clock.advance(29.0)  # not yet healthy for long enough
    decisions.append(healer.exited("ranking-0", 1))
    clock.advance(2.0)
    healer.started("ranking-0")
    clock.advance(30.0)  # ran for reset_after: this exit is a new fault
    decisions.append(healer.exited("ranking-0", 1))
    assert [d.delay for d in decisions if isinstance(d, Restart)] == [0.5, 1, 2, 0.5]


def test_the_exit_after_max_restarts_within_the_window_is_a_crash_loop() -> None:
    clock = FakeClock()
    healer = Healer(RestartPolicy(), clock)  # 5 restarts within 60 s
    healer.started("scoring-1")
    decisions = crash_repeatedly(healer, clock, 10, runs_for=1.0)
    assert [type(d) for d in decisions] == [Restart] * 5 + [CrashLoop]
    assert decisions[-1] == CrashLoop(restarts=5, window=60.0)
    assert healer.last_exit("scoring-1") == "killed by SIGKILL"


def test_restarts_spread_wider_than_the_window_never_stop_the_mesh() -> None:
    clock = FakeClock()
    healer = Healer(RestartPolicy(max_restarts=2, window=60), clock)
    healer.started("features-0")
    # Runs 35 s between exits: never a third restart within 60 s.
    decisions = crash_repeatedly(healer, clock, 12, runs_for=35.0, name="features-0")
    assert all(isinstance(d, Restart) for d in decisions), decisions
    assert healer.restarts("features-0") == 12


def test_replicas_are_counted_apart() -> None:
    clock = FakeClock()
    healer = Healer(RestartPolicy(max_restarts=1), clock)
    healer.started("scoring-0")
    healer.started("scoring-1")
    assert isinstance(healer.exited("scoring-0", 0), Restart)
    assert isinstance(healer.exited("scoring-1", 0), Restart)
    clock.advance(1)
    assert isinstance(healer.exited("scoring-0", 0), CrashLoop)
    assert (healer.restarts("scoring-0"), healer.restarts("scoring-1"), healer.restarts("gateway-0")) == (1, 1, 0)


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (0, "exited with code 0"),
        (1, "exited with code 1"),
        (-signal.SIGKILL, "killed by SIGKILL"),
        (-signal.SIGTERM, "killed by SIGTERM"),
        (-200, "killed by signal 200"),
    ],
)
def test_an_exit_is_described_by_its_code_or_signal(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text


@pytest.mark.parametrize(
    "options", [{"first_delay": 0}, {"first_delay": 20, "max_delay": 10}, {"max_restarts": -1}, {"window": 0}]
)
def test_a_policy_that_cannot_work_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**options)  # type: ignore[arg-type]


def test_status_shows_restarts_and_last_exit_and_which_processes_are_alive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_processes(
        tmp_path,
        "127.0.0.1:8080",
        [
            MeshProcess("gateway-0", "gateway", os.getpid(), True, "127.0.0.1:30100"),
            MeshProcess(
                "scoring-1", "scoring", DEAD_PID, True, "127.0.0.1:30301", restarts=2, last_exit="killed by SIGKILL"
            ),
        ],
        supervisor=os.getpid(),
    )
    assert status.main(["--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "supervisor pid" in lines[0] and "(running)" in lines[0]
    assert lines[1].split() == ["NAME", "ROLE", "PID", "ALIVE", "ADDRESS", "RESTARTS", "LAST", "EXIT"]
    assert lines[2].split() == ["gateway-0", "gateway", str(os.getpid()), "yes", "127.0.0.1:30100", "0", "-"]
    assert lines[3].split() == [
        "scoring-1",
        "scoring",
        str(DEAD_PID),
        "no",
        "127.0.0.1:30301",
        "2",
        "killed",
        "by",
        "SIGKILL",
    ]

    assert status.main(["--data-dir", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [(p["name"], p["alive"], p["restarts"]) for p in document["processes"]] == [
        ("gateway-0", True, 0),
        ("scoring-1", False, 2),
    ]
    # `infermesh profile` reads the same file and keeps only the live processes.
    assert [p.name for p in read_processes(tmp_path).processes] == ["gateway-0"]
    assert len(read_run_file(tmp_path).processes) == 2


def test_status_of_a_mesh_whose_supervisor_is_gone_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_processes(tmp_path, "127.0.0.1:8080", [MeshProcess("envoy", "envoy", DEAD_PID, False)], supervisor=DEAD_PID)
    assert status.main(["--data-dir", str(tmp_path)]) == 1
    assert "NOT running" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no mesh is running"):
        status.main(["--data-dir", str(tmp_path / "elsewhere")])


def test_envoy_exiting_stops_the_mesh_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "envoy.log"
    log.write_text("[critical] error initializing configuration: bad listener\n")
    envoy = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    envoy.wait()
    mesh = Mesh(free_topology({}), tmp_path, "redis://127.0.0.1:1/0", tmp_path / "models", tmp_path)
    mesh.children.append(Child("envoy", "envoy", envoy, log))
    with pytest.raises(MeshError) as stopped:
        mesh.heal()
    message = str(stopped.value)
    assert f"envoy (pid {envoy.pid}) exited with code 3; the mesh cannot serve without it" in message
    assert "envoy| [critical] error initializing configuration: bad listener" in message
