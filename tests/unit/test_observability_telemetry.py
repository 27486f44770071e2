"""setup_telemetry() and the span helpers, each case in a fresh interpreter (the tracer
provider is process-global), exporting to a real OTLP receiver where spans are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infermesh.traces.receiver import OtlpReceiver
from infermesh.traces.store import TraceStore

REPO_ROOT = Path(__file__).resolve().parents[2]
OTEL_VARIABLES = [name for name in os.environ if name.startswith("OTEL_")]


def _run(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in OTEL_VARIABLES}
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**clean, **env},
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


SAMPLER = """
import json
from services.runtime.telemetry import setup_telemetry
telemetry = setup_telemetry("probe")
print(json.dumps({"sampler": telemetry.provider.sampler.get_description(), "exporting": telemetry.exporting,
                  "service": telemetry.provider.resource.attributes["service.name"]}))
"""


@pytest.mark.parametrize(
    ("env", "sampler", "exporting"),
    [
        ({}, "ParentBased{root:AlwaysOffSampler,", False),  # nobody receives spans: record none
        ({"OTEL_TRACES_SAMPLER": "always_on"}, "AlwaysOnSampler", False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "ParentBased{root:AlwaysOnSampler,", True),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01",
            },
            "ParentBased{root:TraceIdRatioBased{0.01},",
            True,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"},
            "ParentBased{root:AlwaysOff",
            False,
        ),
    ],
)
def test_sampler_and_export_follow_otel_variables(env: dict[str, str], sampler: str, exporting: bool) -> None:
    result = _run(SAMPLER, **env)
    assert result["sampler"].startswith(sampler), result
    assert result["exporting"] is exporting
    assert result["service"] == "probe"


def test_service_name_from_otel_service_name() -> None:
    assert _run(SAMPLER, OTEL_SERVICE_NAME="scoring-canary")["service"] == "scoring-canary"


HELPERS = """
import asyncio, json, time
from services.runtime.telemetry import (
    child_span, current_span_id, current_trace_id, record_span, set_attributes, setup_telemetry, span, stage_span,
    SPAN_RANKING_PREFIX,
)
telemetry = setup_telemetry("probe")
with child_span("outside") as outside:  # no trace around it: nothing is started
    orphan = outside.get_span_context().is_valid
with span("request", {"infermesh.k": 5}) as root:
    trace_id = current_trace_id()
    root_span_id = current_span_id()
    started = time.perf_counter_ns()
    time.sleep(0.01)
    record_span("infermesh.scoring.queue", started, time.perf_counter_ns(), {"infermesh.batch.id": 7})
    with child_span("MGET", {"db.system.name": "redis"}):
        pass
    with stage_span(SPAN_RANKING_PREFIX, "top_k"):
        set_attributes({"infermesh.items": 20})
    try:
        with span("failing"):
            raise ValueError("boom")
    except ValueError:
        pass
    try:
        with span("cancelled"):  # a BaseException, not an error: no ERROR status
            raise asyncio.CancelledError()
    except asyncio.CancelledError:
        pass
    restored = current_span_id() == root_span_id
telemetry.shutdown()
print(json.dumps({"trace_id": trace_id, "orphan": orphan, "restored": restored}))
"""


def test_span_helpers_build_one_tree() -> None:
    with OtlpReceiver(TraceStore()) as receiver:
        result = _run(HELPERS, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        trace = receiver.store.wait_for(result["trace_id"], lambda t: len(t.spans) == 6, timeout=10)
        assert result["orphan"] is False
        assert result["restored"] is True  # each span's context undone after its `with`
        assert trace is not None and len(trace.spans) == 6
        assert sorted(child for _, (_, child) in trace.edges()) == [
            "MGET",
            "cancelled",
            "failing",
            "infermesh.ranking.top_k",
            "infermesh.scoring.queue",
        ]
        spans = {s.name: s for s in trace.spans}
        queue = spans["infermesh.scoring.queue"]
        assert queue.attributes == {"infermesh.batch.id": 7}
        assert queue.duration_ms >= 10.0  # the interval measured with perf_counter
        assert spans["request"].start_ns <= queue.start_ns and queue.end_ns <= spans["request"].end_ns
        assert spans["infermesh.ranking.top_k"].attributes == {"infermesh.items": 20}
        assert spans["failing"].status == "ERROR" and spans["failing"].status_message == "ValueError: boom"
        assert spans["cancelled"].status != "ERROR" and not spans["cancelled"].events
        assert [e.name for e in spans["failing"].events] == ["exception"]
        assert len(receiver.store.traces()) == 1  # child_span outside a trace exported nothing
