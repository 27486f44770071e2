"""Measured runs shared by `infermesh bench` and the suite: one timed run with a progress
bar, and an open-loop ramp that finds the highest rate meeting a p99 SLO."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from infermesh.bench.loadgen import Plan, RunResult, TargetFactory, run_processes


def measure(target: TargetFactory, plan: Plan, processes: int = 1, label: str = "", progress: bool = True) -> RunResult:
    bar = tqdm(
        total=round(plan.seconds, 1),
        desc=label or plan.mode,
        unit="s",
        leave=False,
        disable=not progress,
        bar_format="{desc}: {bar} {n:.1f}/{total:.0f}s",
    )

    def tick(elapsed: float) -> None:
        bar.n = round(min(elapsed, plan.seconds), 1)
        bar.refresh()

    try:
        return run_processes(target, plan, processes, tick)
    finally:
        bar.close()


# A ramp stops after a step whose p99 is this many times the SLO: the server is saturated.
OVERLOAD_FACTOR = 10


def ramp(
    target: TargetFactory,
    rates: Sequence[float],
    slo_p99_ms: float,
    seconds: float,
    warmup: float,
    processes: int = 1,
    progress: bool = True,
    label: str = "ramp",
) -> dict[str, Any]:
    """Open loop at each rate in turn. The max sustainable rate is the highest rate at which
    this and every lower step met the SLO; the ramp goes on past the first miss (the plot
    shows how latency grows) and stops once a step is far gone: errors, dropped arrivals,
    or p99 over OVERLOAD_FACTOR x the SLO.

    A step that misses while every lower one held is measured once more, and the second
    run decides: one stall of a few hundred ms (a GC pause, a noisy neighbour) fills a short
    step's top percent and would otherwise set the figure for the whole ramp, though every
    higher step holds. The first run stays in the step (`first_try`)."""
    steps: list[dict[str, Any]] = []
    sustainable = 0.0
    missed = False
    for rate in rates:
        step = _ramp_step(target, rate, slo_p99_ms, seconds, warmup, processes, progress, label)
        if not step["sustained"] and not missed:
            first = step
            step = _ramp_step(target, rate, slo_p99_ms, seconds, warmup, processes, progress, f"{label} (again)")
            step["first_try"] = first
        steps.append(step)
        if step["sustained"] and not missed:
            sustainable = rate
        missed = missed or not step["sustained"]
        if step["far_gone"]:
            break
    return {"slo_p99_ms": slo_p99_ms, "max_sustainable_rps": sustainable, "steps": steps}


def _ramp_step(
    target: TargetFactory,
    rate: float,
    slo_p99_ms: float,
    seconds: float,
    warmup: float,
    processes: int,
    progress: bool,
    label: str,
) -> dict[str, Any]:
    result = measure(target, Plan("open", seconds, warmup, rate=rate), processes, f"{label} {rate:.0f}/s", progress)
    step = result.to_json()
    p99 = step["latency_ms"].get("p99", float("inf"))
    failed = sum(step["errors"].values()) + step["dropped"]
    # Sustained: p99 within the SLO and no errors. Latency counts from each request's
    # intended send time, so a server that falls behind the offered rate shows it in p99
    # (comparing completions with rate x seconds would fail on Poisson noise alone).
    step["sustained"] = p99 <= slo_p99_ms and failed == 0
    step["far_gone"] = bool(failed) or p99 > OVERLOAD_FACTOR * slo_p99_ms
    return step
