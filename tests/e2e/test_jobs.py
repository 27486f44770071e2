"""Jobs end to end: real redis-server, real Celery worker processes, a real mesh behind Envoy.

Submit, status, wait and cancel through `infermesh jobs`; a worker SIGKILLed mid-job and
still every request id exactly once in the results; a job's trace and its requests' traces
linked, received by a real OTLP receiver; a malformed job file refused whole, naming its
line; an unknown job id answered NOT_FOUND.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import redis

from infermesh.client import ClientError, MeshClient
from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import SpanRecord, Trace, TraceStore
from infermesh.up.runfile import read_run_file
from infermesh.up.supervisor import Mesh, free_port
from services.jobs.results import read_results
from services.jobs.store import JobStore
from tests.conftest import RedisServer
from tests.processes import metric, read_until, start_service, start_up, stop, wait_until, wait_until_up

REDIS_DB = 9  # a database of its own on the session's test Redis
CANDIDATES = [f"i{n}" for n in range(200)]


class JobsHarness:
    """Workers and `infermesh jobs` sharing one namespace and queue of a test's own."""

    def __init__(self, mesh: Mesh, redis_server: RedisServer, workdir: Path) -> None:
        self.url = redis_server.url_for(REDIS_DB)
        self.workdir = workdir
        name = uuid.uuid4().hex[:8]
        self.namespace, self.queue = f"test:jobs:{name}", f"test-jobs-{name}"
        self.env: dict[str, str] = {
            **os.environ,
            "JOBS_REDIS_URL": self.url,
            "JOBS_NAMESPACE": self.namespace,
            "JOBS_QUEUE": self.queue,
            "JOBS_GATEWAY_TARGET": f"127.0.0.1:{mesh.topology.edge_port}",
            "JOBS_RESULTS_DIR": str(workdir / "results"),
            "JOBS_CHUNK_SIZE": "10",
            "JOBS_CONCURRENCY": "2",
            # Short, so a killed worker's chunk comes back within seconds.
            "JOBS_VISIBILITY_TIMEOUT_SECONDS": "4",
            "OTEL_TRACES_EXPORTER": "none",
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = self.workdir / f"worker-{len(self.workers)}.log"
        worker = start_service("services.jobs.worker", self.env, log)
        self.workers.append(worker)
        return worker

    def jobs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infermesh.cli", "jobs", "--redis-url", self.url,
             "--data-dir", str(self.workdir), *args],
            env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    def submit(self, path: Path) -> str:
        done = self.jobs("submit", str(path))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def status(self, job_id: str) -> dict[str, object]:
        done = self.jobs("status", job_id, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def done(self, job_id: str) -> int:
        """Requests done so far, read from the store (polling through the CLI costs a process each)."""
        return JobStore.from_url(self.url, self.namespace, 60).status(job_id).done

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        for worker in self.workers:
            stop(worker)


@pytest.fixture
def harness(mesh: Mesh, redis_server: RedisServer, tmp_path: Path) -> Iterator[JobsHarness]:
    jobs = JobsHarness(mesh, redis_server, tmp_path)
    try:
        yield jobs
    finally:
        jobs.stop()
        with jobs.redis() as client:
            keys = [*client.scan_iter(match=f"{jobs.namespace}:*"), jobs.queue]
            client.delete(*keys)


def job_file(path: Path, count: int, extra: Mapping[int, dict[str, object]] | None = None) -> Path:
    lines = []
    for n in range(count):
        request = {"request_id": f"req-{n}", "user_id": f"u{n % 10_000}", "candidate_ids": CANDIDATES, "k": 5}
        lines.append(json.dumps({**request, **(extra or {}).get(n, {})}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_submit_status_wait_and_the_results_file(harness: JobsHarness, tmp_path: Path) -> None:
    harness.start_worker()
    # One request for a user the catalog does not have: recorded with its status, not retried.
    path = job_file(tmp_path / "job.jsonl", 40, {7: {"user_id": "nobody"}})
    job_id = harness.submit(path)
    assert len(job_id) == 32

    waited = harness.jobs("wait", job_id)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "completed" in waited.stdout and "39 succeeded, 1 failed" in waited.stdout

    status = harness.status(job_id)
    assert status["state"] == "completed"
    assert (status["total"], status["succeeded"], status["failed"], status["done"]) == (40, 39, 1, 40)
    assert status["finished_at"] and status["started_at"] and status["throughput"] > 0
    results = read_results(status["results"])
    assert [r["request_id"] for r in results] == [f"req-{n}" for n in range(40)]
    assert results[7]["status"] == "NOT_FOUND" and results[7]["error"]
    assert all(len(r["items"]) == 5 and r["trace_id"] for i, r in enumerate(results) if i != 7)


def test_parquet_results(harness: JobsHarness, tmp_path: Path) -> None:
    harness.start_worker()
    output = tmp_path / "out" / "results.parquet"
    done = harness.jobs("submit", str(job_file(tmp_path / "job.jsonl", 12)), "--output", str(output), "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    results = read_results(output)
    assert sorted(r["request_id"] for r in results) == sorted(f"req-{n}" for n in range(12))
    assert all(r["status"] == "OK" and len(r["items"]) == 5 for r in results)


def test_a_worker_killed_mid_job_loses_nothing_and_duplicates_nothing(harness: JobsHarness, tmp_path: Path) -> None:
    victim = harness.start_worker()
    harness.start_worker()
    total = 300
    job_id = harness.submit(job_file(tmp_path / "job.jsonl", total))
    # Mid-job: some chunks done, most still queued, the victim inside one.
    wait_until(lambda: harness.done(job_id) >= 40, 120, "the job never got going")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    harness.start_worker()  # as a supervisor would; the other worker alone would do as well

    waited = harness.jobs("wait", job_id, "--timeout", "240")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    status = harness.status(job_id)
    assert (status["succeeded"], status["failed"]) == (total, 0), status
    ids = [r["request_id"] for r in read_results(status["results"])]
    assert len(ids) == total and set(ids) == {f"req-{n}" for n in range(total)}


def test_cancel_stops_the_rest_of_a_job(harness: JobsHarness, tmp_path: Path) -> None:
    harness.env["JOBS_CONCURRENCY"] = "1"
    harness.start_worker()
    total = 2_000
    job_id = harness.submit(job_file(tmp_path / "job.jsonl", total))
    wait_until(lambda: harness.done(job_id) >= 10, 120, "the job never got going")
    cancelled = harness.jobs("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled" in cancelled.stdout
    # The worker drains the queue, skipping the cancelled job's chunks.
    with harness.redis() as client:
        wait_until(lambda: client.llen(harness.queue) == 0, 120, "the cancelled job's tasks were never drained")
    status = harness.status(job_id)
    assert status["state"] == "cancelled" and status["done"] < total
    waited = harness.jobs("wait", job_id)
    assert waited.returncode == 1 and "cancelled" in waited.stdout
    again = harness.jobs("cancel", job_id)  # idempotent
    assert again.returncode == 0, again.stderr


def test_a_jobs_trace_links_to_its_requests_traces(harness: JobsHarness, tmp_path: Path) -> None:
    """With a real OTLP receiver: the job's trace (GetJob's trace_id) holds its submit root
    (from the CLI) and a span per chunk (from the worker); each request's own trace, which
    the edge and gateway continue (its result's trace_id), links to its chunk and back."""
    with OtlpReceiver(TraceStore()) as receiver:
        harness.env.update({
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_BSP_SCHEDULE_DELAY": "100",
        })  # fmt: skip
        harness.start_worker()
        total = 25  # three chunks of at most 10
        done = harness.jobs("submit", str(job_file(tmp_path / "job.jsonl", total)), "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        status = harness.status(done.stdout.split()[0])
        trace_id = str(status["trace_id"])
        assert len(trace_id) == 32 and f"trace       {trace_id}" in harness.jobs("status", str(status["job_id"])).stdout

        def job_trace_complete(trace: Trace) -> bool:
            names = [s.name for s in trace.spans]
            return names.count("infermesh.jobs.chunk") >= 3 and {
                "infermesh.jobs.submit",
                "infermesh.jobs.results",
            } <= set(names)

        job_trace = receiver.store.wait_for(trace_id, job_trace_complete, timeout=30)
        assert job_trace is not None, [t.title for t in receiver.store.traces()]
        root = job_trace.root
        assert root is not None and root.name == "infermesh.jobs.submit" and root.service == "infermesh-jobs"
        chunks = {s.span_id: s for s in job_trace.spans if s.name == "infermesh.jobs.chunk"}
        assert all(c.parent_span_id == root.span_id and c.service == "jobs-worker" for c in chunks.values())

        results = read_results(status["results"])
        wanted = {r["trace_id"] for r in results}
        assert len(wanted) == total

        def calls() -> list[SpanRecord]:
            return [s for t in receiver.store.traces() if t.trace_id in wanted for s in t.spans
                    if s.name == "/infermesh.gateway.v1.GatewayService/Recommend" and s.kind == "CLIENT"
                    and s.service == "jobs-worker"]  # fmt: skip

        wait_until(lambda: len(calls()) == total, 30, lambda: f"{len(calls())} of {total} request spans arrived")
        linked_back = {link for c in chunks.values() for link in c.links}
        for call in calls():
            assert call.parent_span_id == "" and call.trace_id != trace_id
            ((link_trace, link_span),) = call.links
            assert link_trace == trace_id and link_span in chunks
            assert (call.trace_id, call.span_id) in linked_back
            assert call.attributes["infermesh.job.request_id"].startswith("req-")


def test_a_malformed_job_file_is_refused_whole_naming_the_line(harness: JobsHarness, tmp_path: Path) -> None:
    path = job_file(tmp_path / "job.jsonl", 5)
    lines = path.read_text().splitlines()
    lines[3] = '{"user_id": "u3", "candidate_ids": ["i1"], "k": "twenty"'  # line 4, truncated
    path.write_text("\n".join(lines) + "\n")
    refused = harness.jobs("submit", str(path))
    assert refused.returncode == 2
    assert "INVALID_ARGUMENT" in refused.stderr and "line 4" in refused.stderr, refused.stderr
    with harness.redis() as client:
        assert list(client.scan_iter(match=f"{harness.namespace}:*")) == []
        assert client.llen(harness.queue) == 0


def test_an_unknown_job_id_is_not_found(harness: JobsHarness) -> None:
    for command in ("status", "wait", "cancel"):
        done = harness.jobs(command, "0" * 32)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "NOT_FOUND" in done.stderr and "no job with id" in done.stderr
    assert "NOT_FOUND" in harness.jobs("status", "not-a-job-id").stderr


def _http(method: str, url: str, body: object | None = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_rest_and_the_client_library_at_the_edge(mesh: Mesh, redis_server: RedisServer, tmp_path: Path) -> None:
    """POST /v1/jobs and GET /v1/jobs/{id} through Envoy's transcoder to the mesh's JobService,
    run by a worker with the mesh's jobs settings; MeshClient's job calls on the same port."""
    edge = f"http://127.0.0.1:{mesh.topology.edge_port}"
    env = {**os.environ, **mesh.service_env("jobs", mesh.topology.replicas["jobs"][0]), "OTEL_TRACES_EXPORTER": "none"}
    worker = start_service("services.jobs.worker", env, tmp_path / "worker.log")
    try:
        requests = [{"request_id": f"a{n}", "user_id": f"u{n}", "candidate_ids": CANDIDATES, "k": 3} for n in range(6)]
        code, body = _http("POST", f"{edge}/v1/jobs", {"requests": requests})
        assert code == 200, body
        job = body["job"]
        assert job["total"] == 6 and job["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING")

        def completed() -> bool:
            code, body = _http("GET", f"{edge}/v1/jobs/{job['job_id']}")
            assert code == 200, body
            return body["job"]["state"] == "JOB_STATE_COMPLETED"

        wait_until(completed, 120, "the REST job never completed")
        _, body = _http("GET", f"{edge}/v1/jobs/{job['job_id']}")
        assert (body["job"]["succeeded"], body["job"]["failed"]) == (6, 0)
        assert len(body["job"]["trace_id"]) == 32  # the job's trace, started by the jobs service
        assert [r["request_id"] for r in read_results(body["job"]["results"])] == [f"a{n}" for n in range(6)]

        code, body = _http("GET", f"{edge}/v1/jobs/{'0' * 32}")
        assert code == 404 and body["code"] == 5 and "no job with id" in body["message"], body
        bad = [*requests[:2], {"user_id": "u1"}]
        code, body = _http("POST", f"{edge}/v1/jobs", {"requests": bad})
        assert code == 400 and "request 2: candidate_ids is missing" in body["message"], body

        with MeshClient([f"127.0.0.1:{mesh.topology.edge_port}"], timeout=30) as client:
            submitted = client.submit_job(requests[:2], results_format="parquet")
            assert submitted.total == 2 and submitted.results.endswith(".parquet")
            wait_until(lambda: client.get_job(submitted.job_id).finished, 120, "the client's job never finished")
            assert client.get_job(submitted.job_id).state == "completed"
            with pytest.raises(ClientError) as caught:
                client.get_job("f" * 32)
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(ClientError) as caught:
                client.cancel_job(submitted.job_id)
            assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop(worker)


SCHED_IDLE = 5  # the scheduling policy's number in /proc/<pid>/stat (os.SCHED_IDLE)


def priority_of(pid: int) -> tuple[int, int]:
    """(nice value, scheduling policy) of a process: fields 19 and 41 of /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16]), int(fields[38])


def metrics_ports(output: list[str]) -> dict[str, int]:
    """Replica -> /metrics port, from up's banner line `metrics  gateway-0=:31100  ...`."""
    (line,) = [line for line in output if line.strip().startswith("metrics ")]
    return {name: int(port) for name, port in (entry.split("=:") for entry in line.split()[1:] if "=:" in entry)}


def recommends(port: int) -> float:
    return metric(port, "grpc_server_handled_total", grpc_method="Recommend")


def test_up_starts_supervised_workers(redis_server: RedisServer, reference_data: Path, tmp_path: Path) -> None:
    """`infermesh up --workers 1`: its worker runs a job through the bulk lane (replicas and an
    Envoy of its own, at nice 19), not the online replicas; SIGKILLed, it is started again
    and the next job runs too."""
    data_dir = tmp_path / "data"
    shutil.copytree(reference_data / "models", data_dir / "models")  # skip retraining
    url = redis_server.url  # the reference catalog's
    # API keys at the edge: the workers send none, and the lane's own edge asks for none.
    keys = tmp_path / "api-keys"
    keys.write_text("e2e:a-key-of-the-online-edge\n")
    process = start_up(
        data_dir, url, free_port(), "--workers", "1", "--replicas", "scoring=1", "--api-key-file", str(keys)
    )
    output: list[str] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    jobs = [sys.executable, "-m", "infermesh.cli", "jobs", "--redis-url", url, "--data-dir", str(data_dir)]
    try:
        wait_until_up(process, output, timeout=180)
        requests = tmp_path / "job.jsonl"
        requests.write_text(
            "".join(
                json.dumps({"user_id": f"u{n}", "candidate_ids": ["i1", "i2", "i3"], "k": 2}) + "\n" for n in range(8)
            )
        )
        done = subprocess.run(
            [*jobs, "submit", str(requests), "--wait"], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert str(data_dir / "jobs") in done.stdout  # results under the mesh's data dir

        processes = {p.name: p for p in read_run_file(data_dir).processes}
        lane = ["gateway-bulk-0", "features-bulk-0", "scoring-bulk-0", "ranking-bulk-0", "envoy-bulk", "jobs-worker-0"]
        assert {name: priority_of(processes[name].pid) for name in lane} == dict.fromkeys(lane, (19, SCHED_IDLE))
        assert priority_of(processes["gateway-0"].pid) == priority_of(processes["envoy"].pid) == (0, os.SCHED_OTHER)
        ports = metrics_ports(output)
        assert recommends(ports["gateway-bulk-0"]) == 8  # the job's requests, all in the lane
        assert recommends(ports["gateway-0"]) == 0

        (worker,) = [p for p in read_run_file(data_dir).processes if p.role == "jobs-worker"]
        os.kill(worker.pid, signal.SIGKILL)
        wait_until(lambda: read_until(process, "[", output, 1) and "jobs-worker-0: started again" in "".join(output),
                   60, lambda: "the worker was not restarted:\n" + "".join(output))  # fmt: skip
        again = subprocess.run(
            [*jobs, "submit", str(requests), "--wait"], env=env, capture_output=True, text=True, timeout=180
        )
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
