"""`infermesh profile`: where a running mesh spends its CPU, per process, under load.

    infermesh profile --seconds 10                       # 8 closed-loop clients on the edge
    infermesh profile --seconds 10 --rate 100            # open loop at 100 req/s instead
    infermesh profile --seconds 10 --no-load             # under traffic of your own

Every Python replica the local mesh runs (`infermesh up` lists them in its run file,
<data dir>/processes.json) is sampled with py-spy for the same seconds, without pausing it
(--nonblocking). Written to the output folder:

* <replica>.svg       a flame graph per replica (open in a browser; hover for a frame's share)
* <replica>.txt       its collapsed stacks (input for other flame graph tools)
* summary.md          per process (Envoy and Redis too): CPU ms per request, CPU share of
                      one core, and the functions with the most samples of their own
* summary.json        the same, for scripts

A sample whose innermost Python frame is a wait point (the event loop's run, a selector, a
thread whose target is C code such as grpc's poller, an idle executor worker) is set apart in
the summary, not ranked among the top frames: on many hosts py-spy counts a thread blocked in C
as busy, so these frames hold the idle time (and C code py-spy cannot see into, such as grpc's
Cython layer). /proc's CPU figures are the ones to trust for how busy a process is.

CPU per request comes from /proc (user + system time over the window) divided by the
requests the load generator completed in it; with --no-load only the CPU share is shown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from infermesh import flamegraph
from infermesh.bench.loadgen import Plan, RunResult, run_processes
from infermesh.bench.report import cpu_seconds
from infermesh.bench.targets import factory
from infermesh.cli_help import CommandParser
from infermesh.settings import add_data_dir_argument
from infermesh.up.runfile import MeshProcess, read_processes

PY_SPY_HINT = (
    "py-spy is needed to sample the replicas: it comes with infermesh's dependencies "
    "(`pip install py-spy` if it is missing). In a container it needs the SYS_PTRACE capability."
)


@dataclass
class ProcessProfile:
    name: str
    role: str
    pid: int
    cpu_seconds: float
    cpu_share: float  # of one core, over the window
    cpu_ms_per_request: float | None
    samples: int
    top_frames: list[tuple[str, float]]  # (frame, share of the process's samples), wait points left out
    flamegraph: str | None
    waiting_share: float = 0.0  # of the samples: leaf at a wait point (idle, or C code below it)


def py_spy_binary() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit(PY_SPY_HINT)
    return found


def start_sampling(binary: str, process: MeshProcess, seconds: float, rate: int, raw: Path) -> subprocess.Popen[bytes]:
    argv = [
        binary,
        "record",
        "--pid",
        str(process.pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(raw),
        "--nonblocking",
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_stacks(raw: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw format: one `frame;frame;...;leaf count` line per distinct stack."""
    stacks: Counter[tuple[str, ...]] = Counter()
    if not raw.exists():
        return stacks
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


# Innermost Python frames that mean "waiting" (or running C code below them): (function, file).
WAIT_FRAMES = frozenset(
    {
        ("Runner.run", "asyncio/runners.py"),
        ("run", "uvloop/__init__.py"),
        ("BaseEventLoop.run_forever", "asyncio/base_events.py"),
        ("Thread.run", "threading.py"),
        ("_worker", "concurrent/futures/thread.py"),
        ("Condition.wait", "threading.py"),
        ("Event.wait", "threading.py"),
    }
)


def is_wait_frame(frame: str) -> bool:
    """py-spy's `function (file:line)` is a wait point: WAIT_FRAMES, or any selector's select."""
    function, _, where = frame.partition(" (")
    path = where.rpartition(":")[0]
    if path == "selectors.py" or path.endswith("/selectors.py"):
        return True
    return any(function == name and (path == file or path.endswith("/" + file)) for name, file in WAIT_FRAMES)


def top_frames(stacks: Counter[tuple[str, ...]], limit: int) -> list[tuple[str, float]]:
    """The leaf frames with the most samples, wait points left out (waiting_share counts
    them): where the process itself spends its time. Shares are of all samples."""
    total = sum(stacks.values())
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        if not is_wait_frame(stack[-1]):
            leaves[stack[-1]] += count
    return [(frame, count / total) for frame, count in leaves.most_common(limit)] if total else []


def waiting_share(stacks: Counter[tuple[str, ...]]) -> float:
    """The share of samples whose leaf is a wait point (see the module's docstring)."""
    total = sum(stacks.values())
    waiting = sum(count for stack, count in stacks.items() if is_wait_frame(stack[-1]))
    return waiting / total if total else 0.0


def generate_load(address: str, seconds: float, concurrency: int, rate: float) -> RunResult:
    mode = "open" if rate > 0 else "closed"
    plan = Plan(mode, seconds, warmup=0.0, concurrency=concurrency, rate=rate)
    return run_processes(factory("grpc", address=address), plan, processes=1)


def profile(
    processes: Sequence[MeshProcess],
    out_dir: Path,
    seconds: float,
    *,
    address: str | None,
    concurrency: int = 8,
    rate: float = 0.0,
    sampling_rate: int = 100,
    top: int = 8,
) -> tuple[list[ProcessProfile], RunResult | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = py_spy_binary()
    python = [p for p in processes if p.python]
    samplers = {p.name: start_sampling(binary, p, seconds, sampling_rate, out_dir / f"{p.name}.txt") for p in python}
    cpu_before = {p.name: _cpu(p.pid) for p in processes}
    started = time.perf_counter()
    load = generate_load(address, seconds, concurrency, rate) if address else None
    if load is None:
        time.sleep(seconds)
    window = time.perf_counter() - started
    cpu_after = {p.name: _cpu(p.pid) for p in processes}
    failures = _wait_samplers(samplers, seconds)
    requests = load.completed if load is not None else 0
    profiles = []
    for p in processes:
        used = max(0.0, cpu_after[p.name] - cpu_before[p.name])
        stacks = read_stacks(out_dir / f"{p.name}.txt")
        svg = None
        if stacks:
            svg = f"{p.name}.svg"
            (out_dir / svg).write_text(flamegraph.render(stacks, f"{p.name} (pid {p.pid}), {window:.0f} s"))
        profiles.append(
            ProcessProfile(
                p.name,
                p.role,
                p.pid,
                round(used, 3),
                round(used / window, 3),
                round(1000.0 * used / requests, 3) if requests else None,
                sum(stacks.values()),
                top_frames(stacks, top),
                svg,
                round(waiting_share(stacks), 3),
            )
        )
    for name, why in failures.items():
        print(f"warning: py-spy could not sample {name}: {why}", file=sys.stderr)
    return profiles, load


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def _wait_samplers(samplers: dict[str, subprocess.Popen[bytes]], seconds: float) -> dict[str, str]:
    failures = {}
    for name, sampler in samplers.items():
        try:
            _, stderr = sampler.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            sampler.kill()
            failures[name] = "did not finish"
            continue
        if sampler.returncode != 0:
            failures[name] = (stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
    return failures


def summary_markdown(profiles: Sequence[ProcessProfile], load: RunResult | None, seconds: float) -> str:
    lines = []
    if load is not None:
        p50 = load.percentiles().get("p50", float("nan"))
        lines.append(
            f"Load: {load.completed} requests in {seconds:g} s ({load.achieved_rps:.0f} req/s, p50 {p50:.2f} ms, "
            f"{sum(load.errors.values())} errors)\n"
        )
    lines += [
        "| process | pid | CPU ms/request | CPU (cores) | samples | top frames (own samples) |",
        "|---|---|---|---|---|---|",
    ]
    for p in profiles:
        per_request = f"{p.cpu_ms_per_request:.3f}" if p.cpu_ms_per_request is not None else "-"
        ranked = [f"{share:.0%} {frame}" for frame, share in p.top_frames]
        if p.waiting_share:
            ranked.append(f"({p.waiting_share:.0%} at wait points: idle, or C code below them)")
        frames = "<br>".join(ranked) or "-"
        lines.append(f"| {p.name} | {p.pid} | {per_request} | {p.cpu_share:.2f} | {p.samples} | {frames} |")
    known = [p.cpu_ms_per_request for p in profiles if p.cpu_ms_per_request is not None]
    if known:
        lines.append(f"| **all** | | **{sum(known):.3f}** | {sum(p.cpu_share for p in profiles):.2f} | | |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="infermesh profile", description=__doc__.splitlines()[0])
    add_data_dir_argument(p, "the mesh's data dir, as given to `up`")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to sample under load")
    p.add_argument("--address", default=None, help="edge to load (default: the run file's edge)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=8, help="closed-loop clients (default 8)")
    load.add_argument("--rate", type=float, default=0.0, help="open loop at this many req/s instead")
    load.add_argument("--no-load", action="store_true", help="send nothing: profile under your own traffic")
    p.add_argument("--sampling-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=8, help="frames per process in the summary")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="where the flame graphs and summary go (default: profile-<time>)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.rate < 0 or args.sampling_rate < 1:
        raise SystemExit("--seconds, --concurrency and --sampling-rate must be positive, --rate not negative")
    run = read_processes(args.data_dir)
    address = None if args.no_load else (args.address or run.edge)
    out_dir = args.out_dir or Path(time.strftime("profile-%Y%m%d-%H%M%S"))
    print(f"profiling {len(run.processes)} processes for {args.seconds:g} s into {out_dir}/ ...", flush=True)
    profiles, load = profile(
        run.processes,
        out_dir,
        args.seconds,
        address=address,
        concurrency=args.concurrency,
        rate=args.rate,
        sampling_rate=args.sampling_rate,
        top=args.top,
    )
    table = summary_markdown(profiles, load, args.seconds)
    (out_dir / "summary.md").write_text(table)
    document = {"seconds": args.seconds, "processes": [asdict(p) for p in profiles]}
    if load is not None:
        document["load"] = load.to_json()
    (out_dir / "summary.json").write_text(json.dumps(document, indent=2))
    print(table)
    print(f"flame graphs: {out_dir}/<process>.svg")
    return 0
