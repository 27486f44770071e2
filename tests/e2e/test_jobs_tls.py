"""Jobs through a TLS edge: `infermesh up --tls DIR --workers 1`, with and without
`--no-bulk-lane`.

The edge then serves TLS only, as the production overlay's does, and so does the bulk lane's
own Envoy. The supervisor's worker, with the environment `up` gives it
(JOBS_GATEWAY_TLS_CA_FILE: the local CA), runs a job's requests through the real Envoy's
TLS edge to the gateway, and every one succeeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infermesh import certs
from infermesh.up.lanes import BULK, bulk_lane
from infermesh.up.supervisor import DESCRIPTOR_SET, free_port
from services.jobs.results import read_results
from services.runtime.topology import GATEWAY, SCORING
from tests.conftest import RedisServer, running_mesh, seed_small
from tests.processes import metric

pytestmark = pytest.mark.timeout(300)

SEED = 14
REDIS_DB = 14  # a database of its own on the session's test Redis
REQUESTS = 8


def _jobs(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    return subprocess.run(
        [sys.executable, "-m", "infermesh.cli", "jobs", "--redis-url", url, "--data-dir", str(data_dir), *args],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize("lane", [False, True], ids=["online-edge", "bulk-lane"])
def test_a_worker_completes_a_job_through_the_tls_edge(redis_server: RedisServer, tmp_path: Path, lane: bool) -> None:
    url = redis_server.url_for(REDIS_DB)
    seed_small(tmp_path, url, SEED, force=True)
    assert certs.main(["--out", str(tmp_path / "certs")]) == 0
    requests = tmp_path / "job.jsonl"
    requests.write_text(
        "".join(
            json.dumps({"request_id": f"r{n}", "user_id": f"u{n}", "candidate_ids": ["i1", "i2", "i3"], "k": 2}) + "\n"
            for n in range(REQUESTS)
        )
    )
    # nice 0: the lane's priority is not what this test is about, and the machine may be busy.
    bulk = bulk_lane(DESCRIPTOR_SET, free_port, 0) if lane else None
    with running_mesh(tmp_path, url, {SCORING: 1}, tls=certs.CertPaths(tmp_path / "certs"), bulk=bulk) as mesh:
        mesh.start_workers(1)
        submitted = _jobs(url, tmp_path, "submit", str(requests))
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        waited = _jobs(url, tmp_path, "wait", job_id, "--timeout", "120")
        worker_log = (mesh.log_dir / "jobs-worker-0.log").read_text(errors="replace")
        assert waited.returncode == 0, waited.stdout + waited.stderr + worker_log
        status = json.loads(_jobs(url, tmp_path, "status", job_id, "--json").stdout)
        assert (status["state"], status["succeeded"], status["failed"]) == ("completed", REQUESTS, 0), worker_log
        results = read_results(status["results"])
        assert sorted(r["request_id"] for r in results) == [f"r{n}" for n in range(REQUESTS)]
        assert all(r["status"] == "OK" and len(r["items"]) == 2 for r in results)
        # Through the (lane's) edge to its gateway: the only way in, and it speaks TLS only.
        gateway = f"{GATEWAY}-{BULK}-0" if lane else f"{GATEWAY}-0"
        gateway_calls = metric(mesh.metrics_ports[gateway], "grpc_server_handled_total", grpc_method="Recommend")
        assert gateway_calls == REQUESTS
