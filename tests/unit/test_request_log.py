"""The fast `rpc` line (services.runtime.logs.RequestLog) writes what structlog would."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator

import pytest
import structlog

from services.runtime.logs import configure_logging, get_logger, request_log


@pytest.fixture()
def logging_to(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], io.StringIO]]:
    """configure_logging() writing to a buffer (set in the test's own phase: pytest swaps
    sys.stderr between phases), undone afterwards for the other tests."""
    handlers = logging.getLogger().handlers[:]

    def configure(level: str) -> io.StringIO:
        sink = io.StringIO()
        monkeypatch.setattr(sys, "stderr", sink)
        configure_logging("ranking", level)
        return sink

    yield configure
    request_log.configure(io.StringIO(), False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logging.getLogger().handlers[:] = handlers


def test_the_fast_line_has_structlogs_fields_and_values(logging_to: Callable[[str], io.StringIO]) -> None:
    stderr = logging_to("INFO")
    method, ids = '/infermesh.ranking.v1.RankingService/Rank"odd\\', ("ab" * 16, "cd" * 8, True)
    get_logger().info("rpc", grpc_method=method, grpc_code="OK", duration_ms=1.25, trace_id=ids[0], span_id=ids[1])
    reference = json.loads(stderr.getvalue())
    fast = io.StringIO()
    request_log.configure(fast, True)
    request_log.info(method, "OK", 1.25, ids)
    line = fast.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    written = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", written.pop("timestamp"))
    reference.pop("timestamp")
    assert written == reference


def test_without_a_trace_the_line_has_no_trace_ids(logging_to: Callable[[str], io.StringIO]) -> None:
    logging_to("INFO")
    fast = io.StringIO()
    request_log.configure(fast, True)
    request_log.info("/a.B/C", "OK", 0.5, None)
    assert "trace_id" not in json.loads(fast.getvalue())


def test_above_info_the_fast_line_is_off(logging_to: Callable[[str], io.StringIO]) -> None:
    stderr = logging_to("WARNING")
    assert not request_log.enabled
    request_log.info("/a.B/C", "OK", 0.5, None)
    assert stderr.getvalue() == ""
