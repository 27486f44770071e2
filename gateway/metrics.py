"""The gateway's own Prometheus instruments (beside the shared grpc_server_* ones).

* `gateway_degraded_responses_total{reason}`: Recommend responses answered with a fallback,
  once per reason a response carries: which stage fell back.
* `gateway_requests_total{experiment,arm,outcome}`: Recommend by experiment arm, once per
  request; outcome ok | degraded | error (the InfermeshDegradedResponses alert's ratio;
  deploy/base/prometheus/metrics.yaml). `gateway_request_seconds{experiment,arm}`: their latency.
* `gateway_shadow_requests_total{model,version,outcome}`: shadow copies of scoring calls,
  one per request (gateway/shadow.py sends them in batches); outcome ok | error | timeout |
  mismatch | dropped (queue full). The batched calls' latency in
  `gateway_shadow_seconds`, their disagreement with the primary in
  `gateway_shadow_score_abs_diff` (mean |primary - shadow| per request) and
  `gateway_shadow_topk_overlap` (share of the primary's top 20 also in the shadow's).
* `gateway_experiments_reloads_total{result}`: ok | error.
* `gateway_stage_batch_requests{stage}`: requests per call to each stage (features,
  scoring, ranking); above 1 when concurrent requests were coalesced into one call; stage
  "shadow": copies per shadow call.
"""

from __future__ import annotations

from typing import Any

from services.runtime.metrics import Metrics

NO_ARM = "none"
DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OVERLAP_BUCKETS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GatewayMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.degraded = metrics.counter(
            "gateway_degraded_responses_total",
            "Recommend responses answered with a fallback and flagged degraded, by reason.",
            ("reason",),
        )
        self.requests = metrics.counter(
            "gateway_requests_total",
            "Recommend requests by experiment arm and outcome (ok, degraded, error).",
            ("experiment", "arm", "outcome"),
        )
        self.latency = metrics.histogram(
            "gateway_request_seconds", "Recommend latency in the gateway by experiment arm.", ("experiment", "arm")
        )
        self.shadow = metrics.counter(
            "gateway_shadow_requests_total",
            "Shadow scoring calls by outcome (ok, error, timeout, mismatch, dropped).",
            ("model", "version", "outcome"),
        )
        self.shadow_latency = metrics.histogram(
            "gateway_shadow_seconds", "Latency of shadow scoring calls.", ("model", "version")
        )
        self.shadow_diff = metrics.histogram(
            "gateway_shadow_score_abs_diff",
            "Mean absolute difference between primary and shadow scores, per request.",
            ("model", "version"),
            buckets=DIFF_BUCKETS,
        )
        self.shadow_overlap = metrics.histogram(
            "gateway_shadow_topk_overlap",
            "Share of the primary's top 20 items also in the shadow's top 20, per request.",
            ("model", "version"),
            buckets=OVERLAP_BUCKETS,
        )
        self.shadow_in_flight = metrics.gauge("gateway_shadow_in_flight", "Shadow scoring calls in flight.")
        self.reloads = metrics.counter(
            "gateway_experiments_reloads_total", "Reloads of the experiments file by result (ok, error).", ("result",)
        )

        self.batch_requests = metrics.histogram(
            "gateway_stage_batch_requests",
            "Requests per call to each stage; above 1 when concurrent requests were coalesced.",
            ("stage",),
            buckets=BATCH_BUCKETS,
        )
        self._batch_children: dict[str, Any] = {}
        # Label children by key: .labels() costs microseconds on every request otherwise.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def request(self, experiment: str, arm: str, outcome: str, seconds: float) -> None:
        key = (experiment, arm, outcome)
        children = self._children.get(key)
        if children is None:
            labels = (experiment or NO_ARM, arm or NO_ARM)
            children = self._children[key] = (self.requests.labels(*labels, outcome), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def degraded_reasons(self, reasons: list[str]) -> None:
        for reason in reasons:
            self.degraded.labels(reason).inc()

    def observe_batch(self, stage: str, requests: int) -> None:
        child = self._batch_children.get(stage)
        if child is None:
            child = self._batch_children[stage] = self.batch_requests.labels(stage)
        child.observe(requests)
