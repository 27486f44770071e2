"""How `infermesh chaos` turns a scenario's load and fault into a row: what counts as failed,
when a scenario lost a request it must not (--short's exit status), and the time to recover."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from infermesh.bench.loadgen import RunResult
from infermesh.chaos import Answer, Fault, Recorder, Scenario, format_row, recovery, summarize


async def _no_fault(_: object) -> Fault:
    return Fault()


def scenario(must_not_fail: bool = False, slow_ms: float | None = None) -> Scenario:
    return Scenario("kill-scoring", "SIGKILL", 8.0, _no_fault, must_not_fail=must_not_fail, slow_ms=slow_ms)


def run(answered: int, errors: dict[str, int] | None = None) -> RunResult:
    return RunResult("open", 8.0, 60.0, None, np.linspace(10.0, 30.0, answered), Counter(errors or {}))


def recorder(*answers: Answer) -> Recorder:
    found = Recorder(None, [])  # type: ignore[arg-type]
    found.answers.extend(answers)
    return found


def test_a_failed_request_where_none_may_fail_is_lost() -> None:
    row = summarize(scenario(must_not_fail=True), run(100, {"UNAVAILABLE": 2}), recorder(), Fault(10.0, 11.0))
    assert (row.sent, row.failed, row.lost) == (102, 2, True)
    assert "UNAVAILABLE 2" in row.notes
    row = summarize(scenario(must_not_fail=True), run(100), recorder(), Fault(10.0, 11.0))
    assert (row.sent, row.failed, row.lost) == (100, 0, False)
    assert row.p50_ms == pytest.approx(20.0)


def test_failures_elsewhere_are_reported_not_lost() -> None:
    row = summarize(scenario(), run(100, {"RESOURCE_EXHAUSTED": 30}), recorder(), Fault(10.0, 10.0))
    assert (row.failed, row.lost) == (30, False)


def test_bad_inputs_count_their_answers_and_a_5xx_is_lost() -> None:
    fault = Fault(bad_inputs=Counter({"4xx": 10, "5xx": 2}), bad_input_ms=[1.0] * 12)
    row = summarize(scenario(), run(300, {"UNAVAILABLE": 1}), recorder(), fault)
    assert (row.sent, row.failed, row.lost, row.recovered_s) == (12, 3, True, None)
    assert "4xx 10, 5xx 2; load beside them: 1 of 301 failed" in row.notes
    clean = summarize(scenario(), run(300), recorder(), Fault(bad_inputs=Counter({"4xx": 12}), bad_input_ms=[1.0] * 12))
    assert (clean.failed, clean.lost) == (0, False)


def test_recovery_waits_for_the_process_and_the_last_bad_answer() -> None:
    fault = Fault(ended_at=100.0, back_at=101.5)
    assert recovery(fault, recorder(Answer(99.0, 0.01, True, False)), None) == pytest.approx(1.5)
    degraded_later = recorder(Answer(103.0, 0.01, False, True), Answer(104.0, 0.01, False, False))
    assert recovery(fault, degraded_later, None) == pytest.approx(3.0)
    slow = recorder(Answer(105.0, 0.5, False, False))
    assert recovery(fault, slow, None) == pytest.approx(1.5)  # slowness counts only for overload
    assert recovery(fault, slow, 200.0) == pytest.approx(5.0)


def test_a_replica_that_never_came_back_is_lost_and_shown_as_never() -> None:
    fault = Fault(ended_at=100.0, never_back=True, notes=["ranking-0 not back in 60 s"])
    row = summarize(scenario(), run(100), recorder(), fault)
    assert row.lost and row.recovered_s is None
    assert "| never |" in format_row(row)


def test_overload_reports_goodput_and_how_fast_rejections_came() -> None:
    from infermesh.chaos import overload_figures

    answers = [Answer(100.0 + n / 100, 0.02, False, False) for n in range(200)]  # 200 in 2 s
    answers += [Answer(100.5, 0.002, True, False)] * 50 + [Answer(99.0, 0.001, False, False)]  # one before
    text = overload_figures(recorder(*answers), 100.0, 102.0)
    assert text == "answered 100/s during it, failed ones in p99 2.0 ms"
    assert overload_figures(recorder(*answers[:10]), 100.0, 102.0) == "answered 5/s during it"
