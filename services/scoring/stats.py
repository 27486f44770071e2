"""Triton-like per-version statistics and the nv_inference_* Prometheus instruments.

The instruments follow Triton's metrics documentation (docs/user_guide/metrics.md of
triton-inference-server/server): names, types, labels `model` and `version`, and on
nv_inference_request_failure the label `reason` with Triton's four values.

Statistics are plain counters touched only on the event loop (the batcher's workers and the
servicer run there), so they need no locks. Prometheus children are bound to a model and
version once, at load, so the request path does no label lookups.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from services.genproto.inference import grpc_predict_v2_pb2 as pb
from services.runtime.metrics import Metrics

# Rows per executed batch: powers of two up to the largest max_batch_size we expect.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(0, 14))


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class Statistics:
    """Per request: success, fail, queue, compute_*, cache_*; per batch: batch_stats."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows (batch elements) inferred
    execution_count: int = 0  # model executions (batches)
    last_inference_ms: int = 0
    batches: dict[int, BatchStat] = field(default_factory=dict)

    def record_batch(self, requests: int, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        # Each request in the batch waited for the whole batch's compute, as in Triton.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        stat = self.batches.get(rows)
        if stat is None:
            stat = self.batches[rows] = BatchStat()
        stat.compute_input.add(input_ns)
        stat.compute_infer.add(infer_ns)
        stat.compute_output.add(output_ns)

    def inference_stats(self) -> pb.InferStatistics:
        return pb.InferStatistics(
            success=self.success.proto(),
            fail=self.fail.proto(),
            queue=self.queue.proto(),
            compute_input=self.compute_input.proto(),
            compute_infer=self.compute_infer.proto(),
            compute_output=self.compute_output.proto(),
            cache_hit=self.cache_hit.proto(),
            cache_miss=self.cache_miss.proto(),
        )

    def batch_stats(self) -> list[pb.InferBatchStatistics]:
        return [
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=stat.compute_input.proto(),
                compute_infer=stat.compute_infer.proto(),
                compute_output=stat.compute_output.proto(),
            )
            for size, stat in sorted(self.batches.items())
        ]


# Triton's failure reasons (label `reason` of nv_inference_request_failure).
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


class ScoringMetrics:
    """The instruments, declared once on the service's registry.

    Triton's families (nv_inference_*, nv_cache_*) under Triton's names, types and labels:
    counters without `_total` or `_created` (Metrics.bare_counter), durations in
    microseconds. The rest is the project's own, prefixed `scoring_`.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.registry = metrics  # the drift monitors declare their gauges on it too
        labels = ("model", "version")

        def triton(name: str, documentation: str, extra: tuple[str, ...] = ()) -> Counter:
            return metrics.bare_counter(name, documentation, (*labels, *extra))

        self.success = triton(
            "nv_inference_request_success", "Inference requests answered, each counted once whatever its batch size"
        )
        self.failure = triton(
            "nv_inference_request_failure",
            "Inference requests that failed, each counted once, by reason (REJECTED, CANCELED, BACKEND, OTHER)",
            ("reason",),
        )
        self.count = triton("nv_inference_count", "Rows inferred (batch elements); cached answers not included")
        self.exec_count = triton("nv_inference_exec_count", "Model executions (batches); cached answers not included")
        self.request_us = triton(
            "nv_inference_request_duration_us",
            "Microseconds spent handling requests, end to end, summed (cached answers included)",
        )
        self.queue_us = triton(
            "nv_inference_queue_duration_us",
            "Microseconds requests waited in the batcher's queue, summed (cached answers included)",
        )
        self.compute_input_us = triton(
            "nv_inference_compute_input_duration_us",
            "Microseconds spent preparing inputs (batch concatenation), summed per request",
        )
        self.compute_us = triton(
            "nv_inference_compute_infer_duration_us", "Microseconds spent executing the model, summed per request"
        )
        self.compute_output_us = triton(
            "nv_inference_compute_output_duration_us",
            "Microseconds spent splitting outputs back to requests, summed per request",
        )
        self.pending = metrics.gauge(
            "nv_inference_pending_request_count", "Requests in the batcher: queued or executing", labels
        )
        self.cache_hits = triton("nv_cache_num_hits_per_model", "Prediction cache hits")
        self.cache_misses = triton("nv_cache_num_misses_per_model", "Prediction cache misses")
        self.cache_hit_us = triton(
            "nv_cache_hit_duration_per_model", "Microseconds spent on prediction cache lookups that hit, summed"
        )
        self.cache_miss_us = triton(
            "nv_cache_miss_duration_per_model", "Microseconds spent on prediction cache lookups that missed, summed"
        )
        self.batch_size = metrics.histogram(
            "scoring_batch_size", "Rows per model execution", labels, buckets=BATCH_SIZE_BUCKETS
        )
        self.cache_available = metrics.gauge(
            "scoring_prediction_cache_available", "1 while the Redis prediction cache answers, 0 after an outage"
        )
        self.model_info = metrics.gauge(
            "scoring_model_info",
            "Loaded model versions and the execution provider they run on",
            (*labels, "provider", "io_binding"),
        )
        # The memory budget (SCORING_MODEL_MEMORY_BUDGET_BYTES), by models.memory_estimate.
        self.model_memory = metrics.gauge(
            "scoring_model_memory_bytes",
            "Estimated memory of loaded model versions (model file x instances), draining ones included",
        )
        self.model_memory_budget = metrics.gauge(
            "scoring_model_memory_budget_bytes", "SCORING_MODEL_MEMORY_BUDGET_BYTES; 0 = no budget"
        )
        self.evictions = metrics.counter(
            "scoring_model_evictions",
            "Model versions unloaded to fit the memory budget (least recently used first)",
            labels,
        )

    def bind(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(self, model, version)


class VersionMetrics:
    """Children bound to one model version, plus the failure reasons used so far."""

    def __init__(self, parent: ScoringMetrics, model: str, version: str) -> None:
        self._parent = parent
        self._labels = (model, version)
        self.success: Counter = parent.success.labels(model, version)
        self.count: Counter = parent.count.labels(model, version)
        self.exec_count: Counter = parent.exec_count.labels(model, version)
        self.request_us: Counter = parent.request_us.labels(model, version)
        self.queue_us: Counter = parent.queue_us.labels(model, version)
        self.compute_input_us: Counter = parent.compute_input_us.labels(model, version)
        self.compute_us: Counter = parent.compute_us.labels(model, version)
        self.compute_output_us: Counter = parent.compute_output_us.labels(model, version)
        self.pending: Gauge = parent.pending.labels(model, version)
        self.batch_size: Histogram = parent.batch_size.labels(model, version)
        self.cache_hits: Counter = parent.cache_hits.labels(model, version)
        self.cache_misses: Counter = parent.cache_misses.labels(model, version)
        self.cache_hit_us: Counter = parent.cache_hit_us.labels(model, version)
        self.cache_miss_us: Counter = parent.cache_miss_us.labels(model, version)
        # Every reason at 0 from the start, as Triton shows them: rate() sees the first failure.
        self._failures = {reason: parent.failure.labels(model, version, reason) for reason in FAILURE_REASONS}

    def failure(self, reason: str) -> Counter:
        """The failure counter of one of FAILURE_REASONS (OTHER for anything else: it is
        called while an error propagates, and must not raise one of its own)."""
        return self._failures.get(reason) or self._failures["OTHER"]

    def publish_info(self, provider: str, io_binding: bool) -> None:
        self._parent.model_info.labels(*self._labels, provider, str(io_binding).lower()).set(1)

    def retire(self, provider: str, io_binding: bool) -> None:
        """An unloaded version leaves the info gauge and the pending gauge; counters stay."""
        for gauge, labels in (
            (self._parent.model_info, (*self._labels, provider, str(io_binding).lower())),
            (self._parent.pending, self._labels),
        ):
            with contextlib.suppress(KeyError):  # never published
                gauge.remove(*labels)


class GpuMemoryCollector:
    """nv_gpu_memory_{used,total}_bytes per GPU, read from NVML at scrape time (as Triton does)."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu_uuid"])
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU memory", labels=["gpu_uuid"])
        nvml = self._nvml
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([uuid], float(memory.used))
            total.add_metric([uuid], float(memory.total))
        yield used
        yield total


def load_nvml() -> Any | None:
    """NVML (pynvml, from nvidia-ml-py in the `gpu` extra), initialised; None without it."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU
        return None
    return nvml


def register_gpu_memory(registry: CollectorRegistry) -> bool:
    """Add the GPU memory gauges when NVML is there (the `gpu` extra); False elsewhere."""
    nvml = load_nvml()
    if nvml is None:
        return False
    registry.register(GpuMemoryCollector(nvml))
    return True
