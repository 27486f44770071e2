"""Scoring's metrics come out under Triton's names, types and labels, in the plain text format
and in OpenMetrics, over HTTP as a scraper gets them; the project's own keep their namespace.

TRITON is the list Triton documents (docs/user_guide/metrics.md of
triton-inference-server/server: "Inference Request Metrics", "Latencies" counters, "GPU
Metrics" memory, "Response Cache Metrics"), with the label sets Triton exposes. Its
families are counters named without `_total`, and have no `_created` series.
tests/e2e/test_metrics_exported.py reads the same from a real scoring replica.
"""

from __future__ import annotations

import asyncio
import gzip
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from services.runtime.errors import DeadlineExceeded, InvalidArgument, Overloaded
from services.runtime.metrics import Metrics, exposition, serve_exposition
from services.scoring.batcher import InferenceFailed
from services.scoring.service import _failure_reason
from services.scoring.stats import FAILURE_REASONS, ScoringMetrics
from tests.metrics_contract import TRITON_REQUIRED, Exposition, parse_exposition

MODEL_LABELS = frozenset({"model", "version"})
TRITON: dict[str, tuple[str, frozenset[str]]] = {
    # Counts
    "nv_inference_request_success": ("counter", MODEL_LABELS),
    "nv_inference_request_failure": ("counter", MODEL_LABELS | {"reason"}),
    "nv_inference_count": ("counter", MODEL_LABELS),
    "nv_inference_exec_count": ("counter", MODEL_LABELS),
    "nv_inference_pending_request_count": ("gauge", MODEL_LABELS),
    # Latencies (counters, microseconds)
    "nv_inference_request_duration_us": ("counter", MODEL_LABELS),
    "nv_inference_queue_duration_us": ("counter", MODEL_LABELS),
    "nv_inference_compute_input_duration_us": ("counter", MODEL_LABELS),
    "nv_inference_compute_infer_duration_us": ("counter", MODEL_LABELS),
    "nv_inference_compute_output_duration_us": ("counter", MODEL_LABELS),
    # Response cache
    "nv_cache_num_hits_per_model": ("counter", MODEL_LABELS),
    "nv_cache_num_misses_per_model": ("counter", MODEL_LABELS),
    "nv_cache_hit_duration_per_model": ("counter", MODEL_LABELS),
    "nv_cache_miss_duration_per_model": ("counter", MODEL_LABELS),
    # GPU memory (NVML; the `gpu` extra on a machine with a GPU)
    "nv_gpu_memory_total_bytes": ("gauge", frozenset({"gpu_uuid"})),
    "nv_gpu_memory_used_bytes": ("gauge", frozenset({"gpu_uuid"})),
}
# Triton's failure reasons (label `reason` of nv_inference_request_failure).
TRITON_FAILURE_REASONS = {"REJECTED", "CANCELED", "BACKEND", "OTHER"}
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture
def metrics() -> Metrics:
    """A scoring registry as the service builds it, one version bound and used."""
    metrics = Metrics("scoring")
    metrics.rpc().observe("/inference.GRPCInferenceService/ModelInfer", "OK", 0.001)
    version = ScoringMetrics(metrics).bind("ranker", "1")
    version.success.inc()
    version.failure("REJECTED").inc()
    for counter in (
        version.count,
        version.exec_count,
        version.request_us,
        version.queue_us,
        version.compute_input_us,
        version.compute_us,
        version.compute_output_us,
        version.cache_hits,
        version.cache_misses,
        version.cache_hit_us,
        version.cache_miss_us,
    ):
        counter.inc(3)
    version.pending.set(2)
    version.batch_size.observe(3)
    return metrics


def triton_families(parsed: Exposition) -> dict[str, str]:
    return {name: kind for name, kind in parsed.types.items() if name.startswith("nv_")}


def check_triton_exposition(parsed: Exposition) -> None:
    exposed = triton_families(parsed)
    assert set(exposed) >= TRITON_REQUIRED, sorted(TRITON_REQUIRED - set(exposed))
    assert set(exposed) <= set(TRITON), f"not a family Triton documents: {sorted(set(exposed) - set(TRITON))}"
    for name, kind in exposed.items():
        assert kind == TRITON[name][0], (name, kind)
        samples = [s for s in parsed.samples if s.name.startswith(name)]
        assert samples, f"{name} has no sample"
        for sample in samples:
            assert sample.name == name, f"{sample.name}: Triton's series carry the family's name exactly"
            assert set(sample.labels) == TRITON[name][1], (sample.name, sample.labels)
    reasons = {s.labels["reason"] for s in parsed.samples if s.name == "nv_inference_request_failure"}
    assert reasons == TRITON_FAILURE_REASONS


def test_text_format_has_tritons_names_types_and_labels(metrics: Metrics) -> None:
    body, content_type = exposition(metrics.registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    check_triton_exposition(parse_exposition(text))
    assert 'nv_inference_count{model="ranker",version="1"} 3.0\n' in text
    for line in text.splitlines():  # HELP, TYPE and sample lines alike
        name = line.split(" ")[2] if line.startswith("# ") else line.split("{")[0].split(" ")[0]
        if name.startswith("nv_"):
            assert not name.endswith(("_total", "_created")), line


def test_openmetrics_has_them_too(metrics: Metrics) -> None:
    body, content_type = exposition(metrics.registry, OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    check_triton_exposition(parse_exposition(text.removesuffix("# EOF\n")))
    assert "_created" not in "".join(line for line in text.splitlines() if line.startswith("nv_"))


def test_project_metrics_keep_their_namespace_and_suffixes(metrics: Metrics) -> None:
    parsed = parse_exposition(exposition(metrics.registry)[0].decode())
    assert parsed.types["grpc_server_handled_total"] == "counter"
    assert parsed.types["grpc_server_handling_seconds"] == "histogram"
    assert parsed.types["scoring_model_evictions_total"] == "counter"
    assert parsed.types["scoring_batch_size"] == "histogram"
    assert "scoring_batch_size_count" in {s.name for s in parsed.samples}
    assert "process_cpu_seconds_total" in parsed.types
    ours = {name for name in parsed.types if not name.startswith(("nv_", "process_", "python_"))}
    assert all(name.startswith(("scoring_", "grpc_server_")) for name in ours), sorted(ours)


def test_the_registry_still_reads_a_triton_counter(metrics: Metrics) -> None:
    assert metrics.registry.get_sample_value("nv_inference_count", {"model": "ranker", "version": "1"}) == 3.0
    assert metrics.registry.get_sample_value("nv_inference_count_total", {"model": "ranker", "version": "1"}) is None


@pytest.fixture
def served(metrics: Metrics) -> Iterator[int]:
    server = serve_exposition(metrics.registry, "127.0.0.1", 0)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, **headers: str) -> tuple[Any, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers, response.read()


def test_the_endpoint_serves_both_formats(served: int) -> None:
    headers, body = get(served)
    assert headers["Content-Type"].startswith("text/plain")
    check_triton_exposition(parse_exposition(body.decode()))
    headers, body = get(served, Accept=OPENMETRICS)
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")
    headers, body = get(served, **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    check_triton_exposition(parse_exposition(gzip.decompress(body).decode()))


@pytest.mark.parametrize(
    "error, reason",
    [
        (Overloaded("queue full"), "REJECTED"),
        (DeadlineExceeded("waited too long"), "REJECTED"),
        (asyncio.CancelledError(), "CANCELED"),
        (InferenceFailed("model execution failed"), "BACKEND"),
        (InvalidArgument("bad shape"), "OTHER"),
        (RuntimeError("anything else"), "OTHER"),
    ],
)
def test_failures_are_counted_under_tritons_reasons(error: BaseException, reason: str) -> None:
    assert _failure_reason(error) == reason
    assert set(FAILURE_REASONS) == TRITON_FAILURE_REASONS
