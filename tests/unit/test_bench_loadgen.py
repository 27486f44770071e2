"""Load-generator logic: open loop must not hide a server's stall (coordinated omission)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from infermesh.bench import runs
from infermesh.bench.loadgen import RunResult, closed_loop, merge, open_loop
from infermesh.bench.plan import plan


def stalling_server(stall: float, service_time: float = 0.001):  # noqa: ANN201
    """A serial server (one request at a time) whose first request takes `stall` seconds."""
    lock = asyncio.Lock()
    calls = {"n": 0}

    async def call(_: int) -> None:
        async with lock:
            calls["n"] += 1
            await asyncio.sleep(stall if calls["n"] == 1 else service_time)

    return call


async def test_open_loop_charges_queueing_to_requests_that_waited() -> None:
    result = await open_loop(stalling_server(0.3), rate=200, seconds=0.6, seed=1)
    slow = int((result.latencies_ms > 100).sum())
    # ~60 arrivals land during the 0.3 s stall; every one of them waited behind it.
    assert slow >= 20, result.to_json()
    assert not result.errors


async def test_closed_loop_sees_the_stall_only_once() -> None:
    result = await closed_loop(stalling_server(0.3), concurrency=1, seconds=0.6)
    assert int((result.latencies_ms > 100).sum()) == 1


async def test_errors_are_counted_by_status() -> None:
    class Boom(Exception):
        status_name = "UNAVAILABLE"

    async def call(n: int) -> None:
        await asyncio.sleep(0)  # like any network call, yield to the other clients
        if n % 2:
            raise Boom()

    result = await closed_loop(call, concurrency=2, seconds=0.1)
    assert result.errors["UNAVAILABLE"] > 0 and result.completed > 0


def test_merge_and_percentiles() -> None:
    a = RunResult("closed", 1.0, None, 2, np.array([1.0, 2.0, 3.0]))
    b = RunResult("closed", 1.2, None, 2, np.array([4.0]))
    merged = merge([a, b])
    assert merged.concurrency == 4 and merged.completed == 4
    assert merged.percentiles()["max"] == 4.0 and merged.seconds == 1.2


def test_plan_replicas_follow_cpu_per_request() -> None:
    result = plan(
        {"gateway": 1.5, "scoring": 0.5, "redis": 0.1},
        target_rps=1000,
        utilisation=0.5,
        cores_per_machine=4,
        price_per_machine_hour=1.0,
    )
    assert result["replicas"] == {"gateway": 3, "scoring": 1}
    assert result["machines"] == 1
    assert abs(result["cost_per_million_requests"] - 1.0 / 3600 * 1000) < 1e-3


def _step(p99_ms: float, errors: int = 0) -> RunResult:
    latencies = np.full(100, p99_ms / 2)
    latencies[-2:] = p99_ms  # the top 2% at p99_ms
    return RunResult("open", 1.0, None, None, latencies, Counter({"UNAVAILABLE": errors}) if errors else Counter())


def fake_steps(monkeypatch: pytest.MonkeyPatch, p99s_by_rate: dict[int, list[float]]) -> list[float]:
    """runs.measure answering each rate's p99s in turn (one per run of that rate)."""
    seen: list[float] = []

    def fake_measure(target, plan, processes, label, progress):  # noqa: ANN001, ANN202
        seen.append(plan.rate)
        return _step(p99s_by_rate[int(plan.rate)].pop(0))

    monkeypatch.setattr(runs, "measure", fake_measure)
    return seen


def test_ramp_sustains_only_below_the_first_miss_and_stops_when_far_gone(monkeypatch) -> None:  # noqa: ANN001
    # p99 per offered rate: 100 ok, 200 ok, 300 misses the 25 ms SLO twice, 400 ok again,
    # 500 is saturated (over 10 x the SLO): the ramp records it and stops.
    p99s = {100: [5.0], 200: [10.0], 300: [40.0, 35.0], 400: [20.0], 500: [400.0], 600: [1.0]}
    seen = fake_steps(monkeypatch, p99s)
    result = runs.ramp(None, list(p99s), slo_p99_ms=25.0, seconds=1.0, warmup=0.0, progress=False)
    assert result["max_sustainable_rps"] == 200  # 400 passed, but after a miss
    # The first miss is measured again; after it, misses are not (500 would have been).
    assert seen == [100, 200, 300, 300, 400, 500]
    assert [s["sustained"] for s in result["steps"]] == [True, True, False, True, False]
    assert result["steps"][2]["latency_ms"]["p99"] == 35.0
    assert result["steps"][2]["first_try"]["latency_ms"]["p99"] == 40.0


def test_one_stall_does_not_set_the_ramps_figure(monkeypatch) -> None:  # noqa: ANN001
    # 200's first run misses (one stall), its second holds: the ramp goes on as if it held.
    p99s = {100: [5.0], 200: [60.0, 9.0], 300: [12.0], 400: [30.0, 28.0], 500: [300.0]}
    seen = fake_steps(monkeypatch, p99s)
    result = runs.ramp(None, list(p99s), slo_p99_ms=25.0, seconds=1.0, warmup=0.0, progress=False)
    assert result["max_sustainable_rps"] == 300
    assert seen == [100, 200, 200, 300, 400, 400, 500]
    assert ["first_try" in s for s in result["steps"]] == [False, True, False, True, False]
    assert result["steps"][1]["sustained"] and not result["steps"][1]["first_try"]["sustained"]


def test_ramp_stops_at_errors(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(runs, "measure", lambda *a, **k: _step(5.0, errors=3))
    result = runs.ramp(None, [100, 200], slo_p99_ms=25.0, seconds=1.0, warmup=0.0, progress=False)
    assert result["max_sustainable_rps"] == 0 and len(result["steps"]) == 1


def test_suite_compares_variants_by_their_median_round() -> None:
    from infermesh.bench.suite import compare, cpu_ms_per_request, median_run

    def run(rps: float, p50: float, cpu: float) -> dict:
        return {"rps": rps, "latency_ms": {"p50": p50}, "cpu_ms_per_request": {"gateway": cpu, "envoy": 1.0}}

    runs = {
        "off": [run(100, 10, 2.0), run(120, 9, 1.0), run(90, 12, 3.0)],
        "100%": [run(80, 12, 3.0), run(85, 11, 2.5), run(70, 14, 4.0)],
    }
    summary = compare(runs, "off")
    assert summary["off"]["rps"] == 100 and summary["off"]["cpu_ms_per_request"] == 3.0
    assert summary["100%"]["rps"] == 80 and summary["100%"]["throughput_change"] == -0.2
    assert summary["100%"]["cpu_ms_per_request"] == 4.0
    chosen = median_run(runs["100%"])
    assert chosen["rps"] == 80 and [r["rps"] for r in chosen["rounds"]] == [80, 85, 70]
    assert chosen["rounds"][0]["cpu_ms_per_request"] == {"gateway": 3.0, "envoy": 1.0}
    assert cpu_ms_per_request({"gateway": 1.0}, {"gateway": 1.5, "envoy": 0.2}, 100) == {"gateway": 5.0, "envoy": 2.0}


def test_coalesced_floor_adds_one_bare_edge_hop_to_the_monoliths_work() -> None:
    from infermesh.bench.suite import coalesced_floor

    floor = {
        "rows": [
            {
                "path": "direct",
                "concurrency": 32,
                "client_us_per_call": 200.0,
                "server_us_per_call": 300.0,
                "envoy_us_per_call": None,
            },
            {
                "path": "envoy",
                "concurrency": 1,
                "client_us_per_call": 300.0,
                "server_us_per_call": 450.0,
                "envoy_us_per_call": 270.0,
            },
            {
                "path": "envoy",
                "concurrency": 32,
                "client_us_per_call": 250.0,
                "server_us_per_call": 350.0,
                "envoy_us_per_call": 200.0,
            },
        ],
        "recommend_floor": {"cores": 2},
    }
    result = coalesced_floor(floor, monolith_cpu_ms=1.2, monolith_rps=1600.0)
    assert result == {
        "edge_hop_cpu_ms": 0.8,
        "cpu_ms_per_request": 2.0,
        "max_requests_per_s": 1000,
        "over_monolith": 0.625,
    }
    # A failed floor run (no rows) or no monolith figure gives no floor rather than a wrong one.
    assert coalesced_floor({"error": "envoy missing"}, 1.2, 1600.0) is None
    assert coalesced_floor(floor, 1.2, 0.0) is None
