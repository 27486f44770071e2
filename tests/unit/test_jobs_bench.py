"""`infermesh jobs bench`'s logic: its requests and how it judges the targets."""

from __future__ import annotations

from typing import Any

import numpy as np

from infermesh.bench.jobs import _merged, job_requests, summary
from infermesh.bench.loadgen import RunResult
from services.genproto.infermesh.gateway.v1 import gateway_pb2


def test_job_requests_have_unique_ids_and_cycle_the_reference_mix() -> None:
    requests = job_requests(2_500)
    assert [r.request_id for r in requests[:3]] == ["r0", "r1", "r2"] and len({r.request_id for r in requests}) == 2_500
    first = gateway_pb2.RecommendRequest.FromString(requests[0].payload)
    assert len(first.candidate_ids) == 200 and first.k == 20 and requests[1000].payload == requests[0].payload


def test_online_windows_merge_back_to_back() -> None:
    windows = [RunResult("open", 5.0, 30.0, None, np.full(150, float(n + 1))) for n in range(3)]
    merged = _merged(windows)
    assert merged["seconds"] == 15.0 and merged["rps"] == 30.0 and merged["latency_ms"]["max"] == 3.0
    assert _merged([]) == {}


def _results(ratio: float, p99: float, exactly_once: bool) -> dict[str, Any]:
    latency = {"latency_ms": {"p99": 10.0}, "rps": 100.0, "concurrency": 8, "errors": {}}
    job = {
        "state": "completed",
        "total": 10,
        "elapsed_seconds": 1.0,
        "throughput": 80.0,
        "failed": 0,
        "submit_seconds": 0.1,
    }
    return {
        "throughput": {
            "capacity": latency, "online_alone": latency, "online_alone_after": latency, "online_rate": 20.0,
            "online_during_job": {"latency_ms": {"p99": 10.0 * p99}, "errors": {}}, "job": job,
            "workers": 2, "concurrency_per_worker": 4, "job_over_capacity": ratio, "online_p99_ratio": p99,
        },
        "kill": {"job": job, "kills_at_seconds": [10.0], "results": 10, "duplicates": 0, "missing": 0,
                 "exactly_once": exactly_once},
    }  # fmt: skip


def test_summary_says_which_target_was_met() -> None:
    lines, met = summary(_results(0.85, 1.2, True))
    assert met and sum("met" in line and "NOT" not in line for line in lines) == 3
    lines, met = summary(_results(0.85, 3.0, True))
    assert not met and any("<= 1.5: NOT met" in line for line in lines)
    assert not summary(_results(0.7, 1.0, True))[1]
    assert not summary(_results(0.9, 1.0, False))[1]
