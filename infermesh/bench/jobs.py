"""`infermesh jobs bench`: the jobs' benchmark targets, on a mesh of its own.

    infermesh jobs bench                               # both parts, the issue's sizes
    infermesh jobs bench --requests 20000 --only throughput --json jobs-bench.json

Starts a redis-server and a mesh on free ports, loopback only (never the user's mesh; the
model comes from --data-dir, trained there if absent), and Celery workers of its own
(`python -m services.jobs.worker`) calling the mesh's edge. Then:

throughput  the mesh's closed-loop throughput (c=8 through the edge: its capacity); an
            open-loop online load at 20% of it alone (its p99); then a job of --requests
            requests run by --workers workers with that online load alongside. Targets:
            job throughput >= 80% of capacity, online p99 <= 1.5x its p99 alone.
kill        a job of --kill-requests requests while a worker is SIGKILLed every
            --kill-every seconds (and started again, as a supervisor would). Target: every
            request id exactly once in the results file, and as many results as requests.

Every part is bounded (--timeout per job: a job still running then is cancelled and
reported as such). Exit status 0 when every target measured was met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infermesh.bench import report
from infermesh.bench.loadgen import Plan, RunResult, merge, open_loop
from infermesh.bench.runs import measure
from infermesh.bench.suite import DEFAULT_REPLICAS, running_mesh
from infermesh.bench.targets import factory, reference_requests
from infermesh.cli_help import CommandParser
from infermesh.envoy.edge_policy import ADMISSION_MIN_CONCURRENCY
from infermesh.settings import add_data_dir_argument
from infermesh.up.lanes import DEFAULT_BULK_NICE, bulk_lane, lowered
from infermesh.up.supervisor import DESCRIPTOR_SET, WORKER_MODULE, free_port, start_redis
from infermesh.workload.seed import seed_all
from services.genproto.infermesh.gateway.v1 import gateway_pb2
from services.jobs.api import Jobs
from services.jobs.inputs import JobRequest
from services.jobs.results import read_results
from services.jobs.settings import JobsSettings
from services.jobs.store import COMPLETED, FINISHED, JobStatus
from services.runtime.event_loop import event_loop_runner
from services.runtime.logs import configure_logging
from services.runtime.settings import load_settings

ONLINE_SHARE = 0.2  # the online load, as a share of the mesh's capacity
THROUGHPUT_TARGET = 0.8  # job throughput / capacity
P99_TARGET = 1.5  # online p99 with the job / alone
ONLINE_WINDOW_S = 5.0  # the online load runs in windows; those wholly inside the job count


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh jobs bench", description=__doc__.splitlines()[0])
    add_data_dir_argument(parser, "where the reference model is (trained there if absent)")
    parser.add_argument("--only", choices=("throughput", "kill"), help="run one part only")
    parser.add_argument(
        "--requests", type=int, default=100_000, help="requests in the throughput job (default %(default)s)"
    )
    parser.add_argument(
        "--kill-requests", type=int, default=20_000, help="requests in the kill job (default %(default)s)"
    )
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between SIGKILLs (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default %(default)s)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="JOBS_CONCURRENCY of each worker (default %(default)s)"
    )
    parser.add_argument(
        "--capacity-concurrency", type=int, default=8,
        help=f"clients of the capacity run (default %(default)s: under the edge's {ADMISSION_MIN_CONCURRENCY} "
        "always-admitted calls, so its "
        "throughput is of answers, not of load shedding's fast rejections)",
    )  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=50, help="JOBS_CHUNK_SIZE (default %(default)s)")
    parser.add_argument(
        "--bulk-nice", type=int, default=DEFAULT_BULK_NICE,
        help="nice value of the jobs' lane and workers, as `infermesh up --workers` runs them (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--no-bulk-lane", action="store_true", help="the workers call the online edge, at the online priority"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="capacity and online-alone runs (default %(default)s s)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="longest a job may run (default %(default)s s)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    return parser


# ---------------------------------------------------------------------------- workers


class Workers:
    """Celery worker processes of one namespace and queue, calling `edge`, at `nice`
    (the bulk lane's priority, as `infermesh up` starts them)."""

    def __init__(
        self, work: Path, redis_url: str, edge: str, args: argparse.Namespace, nice: int = 0, **extra: str
    ) -> None:
        self.nice = nice
        name = uuid.uuid4().hex[:8]
        self.env = {
            **os.environ,
            "JOBS_REDIS_URL": redis_url,
            "JOBS_NAMESPACE": f"bench:jobs:{name}",
            "JOBS_QUEUE": f"bench-jobs-{name}",
            "JOBS_GATEWAY_TARGET": edge,
            "JOBS_RESULTS_DIR": str(work / "results"),
            "JOBS_CHUNK_SIZE": str(args.chunk_size),
            "JOBS_CONCURRENCY": str(args.concurrency),
            "OTEL_TRACES_EXPORTER": "none",
            "LOG_LEVEL": "WARNING",
            **extra,
        }
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def settings(self) -> JobsSettings:
        return load_settings(JobsSettings, {k: v for k, v in self.env.items() if k.startswith("JOBS_")})

    def start(self, count: int = 1) -> None:
        for _ in range(count):
            log = open(self.logs / f"worker-{self.started}.log", "wb")  # noqa: SIM115 (the child keeps it)
            self.processes.append(subprocess.Popen(
                lowered([sys.executable, "-m", WORKER_MODULE], self.nice), env=self.env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))  # fmt: skip
            log.close()
            self.started += 1

    def kill_and_restart(self, index: int) -> None:
        victim = self.processes[index]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.processes.pop(index)
        self.start()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def job_requests(count: int) -> list[JobRequest]:
    """`count` requests cycling through the reference mix (1,000 distinct ones), ids r0.."""
    payloads = [
        gateway_pb2.RecommendRequest(
            user_id=r["user_id"], candidate_ids=r["candidate_ids"], k=r["k"]
        ).SerializeToString()
        for r in reference_requests()
    ]
    return [JobRequest(f"r{n}", payloads[n % len(payloads)]) for n in range(count)]


def follow(jobs: Jobs, job_id: str, timeout: float, every: Callable[[float], None] | None = None) -> JobStatus:
    """Poll until the job finishes or `timeout` passes (then cancel it); `every(elapsed)` each second."""
    began = time.monotonic()
    while True:
        status = jobs.status(job_id)
        if status.state in FINISHED:
            return status
        elapsed = time.monotonic() - began
        if elapsed > timeout:
            print(
                f"  the job is still {status.state} after {timeout:g} s ({status.done}/{status.total}): cancelling it"
            )
            return jobs.cancel(job_id)
        if every is not None:
            every(elapsed)
        time.sleep(1.0)


# ---------------------------------------------------------------------------- parts


def online_while(
    address: str, rate: float, stop: threading.Event, windows: list[tuple[float, float, RunResult]]
) -> None:
    """Open-loop windows at `rate` until `stop`; each window's wall-clock span and result."""

    async def run() -> None:
        call, close = await factory("grpc", address=address)()
        try:
            seed = 100
            while not stop.is_set():
                began = time.time()
                result = await open_loop(call, rate, ONLINE_WINDOW_S, seed=seed)
                windows.append((began, time.time(), result))
                seed += 1
        finally:
            await close()

    event_loop_runner()(run())


def throughput_part(work: Path, redis_url: str, edge: str, jobs_edge: str, args: argparse.Namespace) -> dict[str, Any]:
    """Capacity and the online load through `edge`; the job's calls through `jobs_edge`."""
    target = factory("grpc", address=edge)
    clients = args.capacity_concurrency
    capacity = measure(
        target, Plan("closed", args.seconds, 2.0, concurrency=clients), label=f"capacity c={clients}"
    ).to_json()
    rate = round(ONLINE_SHARE * capacity["rps"], 1)
    print(
        f"  capacity (closed loop c={clients} via the edge): {capacity['rps']} req/s; online load {rate} req/s",
        flush=True,
    )
    workers = Workers(work, redis_url, jobs_edge, args, _nice(args))
    workers.start(args.workers)  # idle until the job comes: they block on Redis
    jobs = Jobs(workers.settings())
    try:
        time.sleep(5)  # the workers' start-up (Celery's imports) off the measurement below
        alone = measure(target, Plan("open", args.seconds * 2, 1.0, rate=rate), label="online alone").to_json()
        print(f"  online alone: p99 {alone['latency_ms'].get('p99')} ms", flush=True)
        requests = job_requests(args.requests)
        submitted = time.monotonic()
        job = jobs.submit(requests, str(work / "results" / "throughput.jsonl"))
        submit_s = time.monotonic() - submitted
        del requests
        stop, windows = threading.Event(), []
        online = threading.Thread(target=online_while, args=(edge, rate, stop, windows), daemon=True)
        online.start()
        status = follow(jobs, job.job_id, args.timeout, _progress(jobs, job.job_id))
        stop.set()
        online.join(timeout=ONLINE_WINDOW_S + 60)
        inside = [r for began, ended, r in windows if status.started_at and began >= status.started_at - 1
                  and ended <= (status.finished_at or time.time())]  # fmt: skip
        during = _merged(inside)
        after = measure(target, Plan("open", args.seconds * 2, 1.0, rate=rate), label="online alone, after").to_json()
    finally:
        workers.stop()
        jobs.close()
    job_rps = status.throughput
    p99_alone, p99_during = alone["latency_ms"].get("p99"), during.get("latency_ms", {}).get("p99")
    return {
        "capacity": capacity,
        "online_rate": rate,
        "online_alone": alone,
        "online_during_job": during,
        "online_alone_after": after,
        "job": {**status.as_dict(), "submit_seconds": round(submit_s, 2)},
        "workers": args.workers,
        "concurrency_per_worker": args.concurrency,
        "chunk_size": args.chunk_size,
        "bulk_lane": None if args.no_bulk_lane else {"nice": args.bulk_nice},
        "job_over_capacity": round(job_rps / capacity["rps"], 3) if capacity["rps"] else None,
        "online_p99_ratio": round(p99_during / p99_alone, 3) if p99_alone and p99_during else None,
    }


def _nice(args: argparse.Namespace) -> int:
    return 0 if args.no_bulk_lane else args.bulk_nice


def kill_part(work: Path, redis_url: str, edge: str, args: argparse.Namespace) -> dict[str, Any]:
    # A killed worker's chunk comes back after the visibility timeout: short, but well above
    # how long a chunk takes (about chunk size / (concurrency x per-call rate): well under 5 s).
    workers = Workers(work, redis_url, edge, args, _nice(args), JOBS_VISIBILITY_TIMEOUT_SECONDS="10")
    workers.start(args.workers)
    jobs = Jobs(workers.settings())
    kills: list[float] = []
    try:
        time.sleep(3)
        job = jobs.submit(job_requests(args.kill_requests), str(work / "results" / "kill.jsonl"))
        began = time.monotonic()

        def every(elapsed: float) -> None:
            if elapsed >= args.kill_every * (len(kills) + 1):
                workers.kill_and_restart(len(kills) % len(workers.processes))
                kills.append(round(time.monotonic() - began, 1))

        status = follow(jobs, job.job_id, args.timeout, every)
    finally:
        workers.stop()
        jobs.close()
    ids = [r["request_id"] for r in read_results(status.results)] if status.state == COMPLETED else []
    counts = Counter(ids)
    expected = {f"r{n}" for n in range(args.kill_requests)}
    return {
        "job": status.as_dict(),
        "kills_at_seconds": kills,
        "results": len(ids),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "missing": len(expected - counts.keys()),
        "unexpected": len(counts.keys() - expected),
        "exactly_once": status.state == COMPLETED and len(ids) == len(expected) and counts.keys() == expected,
    }


def _merged(windows: list[RunResult]) -> dict[str, Any]:
    if not windows:
        return {}
    merged = merge(windows)
    merged.seconds = sum(w.seconds for w in windows)  # back to back, not side by side
    merged.offered_rate = windows[0].offered_rate
    return merged.to_json()


def _progress(jobs: Jobs, job_id: str) -> Callable[[float], None]:
    last = [0.0]

    def every(elapsed: float) -> None:
        if elapsed - last[0] >= 30:
            last[0] = elapsed
            status = jobs.status(job_id)
            print(f"  {elapsed:.0f} s: {status.done}/{status.total}, {status.throughput:.0f} req/s", flush=True)

    return every


# ---------------------------------------------------------------------------- main


def summary(results: dict[str, Any]) -> tuple[list[str], bool]:
    lines, met = [], True
    if "throughput" in results:
        t = results["throughput"]
        job = t["job"]
        ratio, p99 = t["job_over_capacity"], t["online_p99_ratio"]
        ok_rate = job["state"] == COMPLETED and ratio is not None and ratio >= THROUGHPUT_TARGET
        ok_p99 = p99 is not None and p99 <= P99_TARGET
        met = met and ok_rate and ok_p99
        lines += [
            f"capacity (closed loop, c={t['capacity']['concurrency']}, via the edge): {t['capacity']['rps']} req/s, "
            f"p99 {t['capacity']['latency_ms'].get('p99')} ms, errors {t['capacity']['errors']}",
            f"job: {job['total']} requests, {job['state']} in {job['elapsed_seconds']} s = {job['throughput']} req/s "
            f"({job['failed']} failed; {t['workers']} workers x {t['concurrency_per_worker']} in flight; "
            f"submit {job['submit_seconds']} s; "
            + (
                f"in a lane of its own at nice {t['bulk_lane']['nice']})"
                if t.get("bulk_lane")
                else "through the online replicas)"
            ),
            f"job / capacity: {ratio} (target >= {THROUGHPUT_TARGET}: {'met' if ok_rate else 'NOT met'})",
            f"online load {t['online_rate']} req/s: p99 alone {t['online_alone']['latency_ms'].get('p99')} ms, "
            f"with the job {t['online_during_job'].get('latency_ms', {}).get('p99')} ms, alone after "
            f"{t['online_alone_after']['latency_ms'].get('p99')} ms; "
            f"errors during {t['online_during_job'].get('errors')}",
            f"online p99 with / without the job: {p99} (target <= {P99_TARGET}: {'met' if ok_p99 else 'NOT met'})",
        ]
    if "kill" in results:
        k = results["kill"]
        met = met and k["exactly_once"]
        lines += [
            f"kill: {k['job']['total']} requests, {k['job']['state']} in {k['job']['elapsed_seconds']} s, "
            f"{len(k['kills_at_seconds'])} SIGKILLs (at {k['kills_at_seconds']} s)",
            f"kill: {k['results']} results, {k['duplicates']} duplicates, {k['missing']} missing: "
            f"exactly once {'met' if k['exactly_once'] else 'NOT met'}",
        ]
    return lines, met


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("infermesh-jobs-bench", os.environ.get("LOG_LEVEL", "WARNING"))
    results: dict[str, Any] = {
        "machine": report.machine(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "infermesh jobs bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with tempfile.TemporaryDirectory(prefix="infermesh-jobs-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        redis = start_redis(work, port, work / "logs", persist=False)
        redis_url = f"redis://127.0.0.1:{port}/0"
        try:
            data_dir = args.data_dir.resolve()
            print(f"seeding the reference workload into a private Redis ({redis_url})", flush=True)
            seed_all(data_dir, redis_url, progress=sys.stderr.isatty())
            lane = None if args.no_bulk_lane else bulk_lane(DESCRIPTOR_SET, free_port, args.bulk_nice, DEFAULT_REPLICAS)
            with running_mesh(data_dir, redis_url, dict(DEFAULT_REPLICAS), bulk=lane) as mesh:
                edge = f"127.0.0.1:{mesh.topology.edge_port}"
                # The workers' way in: the bulk lane's edge, or the online one.
                jobs_edge = lane.edge.address if lane is not None else edge
                if args.only in (None, "throughput"):
                    print(f"throughput: a job of {args.requests} requests beside an online load", flush=True)
                    results["throughput"] = throughput_part(work, redis_url, edge, jobs_edge, args)
                if args.only in (None, "kill"):
                    print(
                        f"kill: a job of {args.kill_requests} requests, a worker SIGKILLed every {args.kill_every:g} s",
                        flush=True,
                    )
                    results["kill"] = kill_part(work, redis_url, jobs_edge, args)
        finally:
            redis.terminate()
            redis.wait(timeout=10)
    results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines, met = summary(results)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
