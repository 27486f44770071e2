"""`infermesh jobs`: asynchronous and bulk Recommend requests, run by the mesh's Celery workers.

    infermesh jobs submit requests.jsonl [--output results.parquet] [--wait]
    infermesh jobs status JOB_ID [--json]
    infermesh jobs wait JOB_ID [--timeout S]          # a progress bar until it finishes
    infermesh jobs cancel JOB_ID
    infermesh jobs bench [--requests N] [--only throughput|kill]   # infermesh/bench/jobs.py

A job file is JSON Lines (one RecommendRequest in its JSON form per line, plus an optional
`request_id`) or Parquet (the same fields as columns). The whole file is checked before
anything is stored: a bad line refuses the job, naming the line. The commands work on the
jobs' Redis directly (the mesh's, as `infermesh up` runs it, or --redis-url / JOBS_REDIS_URL);
workers (`infermesh up --workers N`) do the work. Exit status: 0 done, 1 a job that failed or
was cancelled (wait), 2 a refused command (bad file, unknown job id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from infermesh.cli_help import CommandParser, add_delegated, number
from infermesh.settings import LOCAL_REDIS_URL, add_data_dir_argument, redis_env, tools_redis_target, tools_redis_url
from services.jobs.settings import JobsSettings
from services.jobs.store import COMPLETED, FINISHED, JobStatus
from services.runtime.errors import InfermeshError, status_for
from services.runtime.settings import SettingsError, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="infermesh jobs", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("JOBS_REDIS_URL") or None,
        help="Redis of the jobs (and Celery's broker unless JOBS_BROKER_URL says otherwise); "
        f"default $JOBS_REDIS_URL, else the mesh's ($INFERMESH_REDIS_URL, $REDIS_URL, {LOCAL_REDIS_URL})",
    )
    add_data_dir_argument(parser, "the mesh's data dir: results go to <data dir>/jobs/<job id>/ by default")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="validate a job file, store it, queue it; print its id")
    submit.add_argument("file", type=Path, help="requests: .jsonl or .parquet")
    submit.add_argument(
        "--output",
        default="",
        help="results file (.jsonl or .parquet; workers write it); default <data dir>/jobs/<id>/results.jsonl",
    )
    submit.add_argument("--wait", action="store_true", help="then wait for it, as `jobs wait`")
    submit.add_argument("--json", action="store_true", help="print the job's status as JSON")
    status = commands.add_parser("status", help="a job's progress: done/failed/total, timing, throughput, ETA, results")
    status.add_argument("job_id", help="the id `jobs submit` printed")
    status.add_argument("--json", action="store_true", help="print the job's status as JSON")
    wait = commands.add_parser("wait", help="follow a job with a progress bar until it finishes")
    wait.add_argument("job_id", help="the id `jobs submit` printed")
    wait.add_argument("--timeout", type=number(above=0), default=None, help="give up after this many seconds (exit 3)")
    wait.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default %(default)s)")
    cancel = commands.add_parser("cancel", help="stop a job: requests not yet run are not run")
    cancel.add_argument("job_id", help="the id `jobs submit` printed")
    # main() hands `bench` and what follows to infermesh.bench.jobs before parsing.
    add_delegated(commands, "bench", "infermesh.bench.jobs", "the jobs' benchmark on a mesh of its own")
    return parser


def _results_note(state: str) -> str:
    """What the results path means while the job is not completed."""
    if state in FINISHED:  # cancelled or failed: no file is coming
        return f", not written: the job {state}"
    return ", written when the job completes"


def describe(status: JobStatus) -> str:
    eta = status.eta_seconds
    lines = [
        f"job {status.job_id}: {status.state}",
        f"  requests    {status.done}/{status.total} done ({status.succeeded} succeeded, {status.failed} failed)",
        f"  elapsed     {status.elapsed_seconds:.1f} s, {status.throughput:.1f} requests/s"
        + (f", ETA {eta:.0f} s" if eta is not None and status.state not in FINISHED else ""),
        f"  results     {status.results} ({status.results_format})"
        + ("" if status.state == COMPLETED else _results_note(status.state)),
    ]
    if status.trace_id:
        lines.append(f"  trace       {status.trace_id} (its requests' traces link to it)")
    if status.error:
        lines.append(f"  error       {status.error}")
    return "\n".join(lines)


def _print(status: JobStatus, as_json: bool) -> None:
    print(json.dumps(status.as_dict(), indent=2) if as_json else describe(status), flush=True)


def wait_for(jobs: object, job_id: str, timeout: float | None, interval: float) -> JobStatus:
    """Poll until the job finishes, with a tqdm bar of requests done (on a terminal)."""
    from tqdm import tqdm

    status = jobs.status(job_id)  # type: ignore[attr-defined]
    deadline = None if timeout is None else time.monotonic() + timeout
    with tqdm(total=status.total, unit="req", desc=job_id[:8], disable=not sys.stderr.isatty()) as bar:
        while True:
            bar.set_postfix_str(f"{status.state}, {status.failed} failed", refresh=False)
            bar.update(status.done - bar.n)
            if status.state in FINISHED:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status.state} after {timeout:g} s")
            time.sleep(interval)
            status = jobs.status(job_id)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own options, --help included
        from infermesh.bench.jobs import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    from services.jobs.api import Jobs  # Celery loads only when a command runs
    from services.runtime.logs import configure_logging
    from services.runtime.telemetry import setup_telemetry

    # stdout is the command's answer (a job id, a status); the library's logs stay out of it.
    configure_logging("infermesh-jobs", os.environ.get("LOG_LEVEL", "WARNING"))

    try:
        url = args.redis_url or tools_redis_url()
        # JOBS_REDIS_* credentials if set, else the tools' (INFERMESH_REDIS_*, or the password
        # `infermesh up` keeps for its Redis).
        tools = (
            {} if os.environ.get("JOBS_REDIS_PASSWORD") else redis_env("JOBS", tools_redis_target(url, args.data_dir))
        )
        settings = load_settings(
            JobsSettings,
            {
                **os.environ,
                **tools,
                "JOBS_REDIS_URL": url,
                "JOBS_RESULTS_DIR": os.environ.get("JOBS_RESULTS_DIR") or str(args.data_dir.resolve() / "jobs"),
            },
        )
        settings.redis().check()
    except SettingsError as error:
        print(f"infermesh jobs: {error}", file=sys.stderr)
        return 2
    # The job's trace starts at submit (OTEL_* as for the services: exported when
    # OTEL_EXPORTER_OTLP_ENDPOINT is set); a cancellation is a span in it.
    try:
        telemetry = setup_telemetry("infermesh-jobs") if args.command in ("submit", "cancel") else None
    except SettingsError as error:
        print(f"infermesh jobs: {error}", file=sys.stderr)
        return 2
    jobs = Jobs(settings)
    try:
        if args.command == "submit":
            status = jobs.submit_file(args.file, str(Path(args.output).resolve()) if args.output else "")
            if not args.wait:
                print(json.dumps(status.as_dict(), indent=2) if args.json else status.job_id, flush=True)
                return 0
            print(status.job_id, flush=True)
            status = wait_for(jobs, status.job_id, None, 0.5)
        elif args.command == "wait":
            status = wait_for(jobs, args.job_id, args.timeout, args.interval)
        elif args.command == "cancel":
            status = jobs.cancel(args.job_id)
        else:
            status = jobs.status(args.job_id)
        _print(status, getattr(args, "json", False))
        if args.command in ("wait", "submit"):
            return 0 if status.state == COMPLETED else 1
        return 0
    except InfermeshError as error:
        print(f"infermesh jobs: {status_for(error).name}: {error}", file=sys.stderr)
        return 2
    except TimeoutError as error:
        print(f"infermesh jobs: {error}", file=sys.stderr)
        return 3
    except redis.RedisError as error:
        print(f"infermesh jobs: cannot reach the jobs' Redis at {settings.redis().shown}: {error}", file=sys.stderr)
        return 2
    finally:
        jobs.close()
        if telemetry is not None:
            telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(main())
