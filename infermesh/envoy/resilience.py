"""Traffic policy: deadlines, per-try timeouts, hedging, retries, retry budgets, circuit
breakers, outlier detection and active health checks.

Every call has a deadline: the caller's grpc-timeout, capped, or the route's default when
the caller sets none (`RouteLimits`). The idempotent RPCs (all of them but the model
repository's load/unload) are retried on UNAVAILABLE / reset / connect failure on another
replica; a try that outlives its per-try timeout is hedged on the gateway's internal hops
(a second try goes to another replica, the first keeps running, the first answer wins), so
a hung replica costs one per-try timeout: the stage's expected latency (EXPECTED_LATENCY),
capped by the gateway's stage budgets. Every cluster has a retry budget, circuit breakers,
outlier detection that ejects a dead or hung replica within a couple of failed calls, and a
grpc.health.v1 check under the service's health name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.budget import DEFAULT_DEADLINE_SECONDS, StageBudgets
from infermesh.envoy.common import EXTENSIONS_TYPE, Json
from services.runtime.topology import (
    BACKENDS,
    FEATURES,
    GATEWAY,
    HEALTH_SERVICE_NAMES,
    JOBS,
    RANKING,
    SCORING,
    http_cluster,
)

NUM_RETRIES = 2
ATTEMPTS = 1 + NUM_RETRIES


@dataclass(frozen=True)
class RouteLimits:
    """How long a call on a route may take (durations as Envoy writes them, "2s").

    default_deadline: a caller that sets no grpc-timeout gets this one, both enforced by
    Envoy (the route's max_stream_duration) and passed on as grpc-timeout, so the service
    plans for the same deadline;
    max_deadline: a caller's grpc-timeout is capped at this;
    per_try_timeout: a try that has not answered by then is retried on another replica
    (None: never cut short, the deadline alone bounds it);
    hedged: the retry of a timed-out try is a hedge (the first try keeps running and the
    first answer wins) rather than a replacement.
    """

    default_deadline: str
    max_deadline: str
    per_try_timeout: str | None
    hedged: bool = False


def duration(seconds: float) -> str:
    """Seconds as an Envoy (protobuf JSON) duration, to the millisecond: 0.233 -> "0.233s"."""
    return f"{round(seconds * 1000) / 1000:g}s"


# The gateway's stages each backend serves (features answers retrieval too).
CLUSTER_STAGES: Mapping[str, tuple[str, ...]] = {
    FEATURES: ("retrieval", "features"),
    SCORING: ("scoring",),
    RANKING: ("ranking",),
}


# How long a healthy replica takes to answer one of the gateway's calls, at the tail: the
# p99 of a (coalesced) call at the usual load on the 2-core machine, with room for a busy
# event loop (docs/reliability.md). A try still running after it is hedged on another
# replica, so a hung replica costs each call that meets it about this much, not the stage's
# budget. features and ranking also absorb a stalled Redis themselves
# (FEATURES_REDIS_TIMEOUT_SECONDS, RANKING_REDIS_TIMEOUT_SECONDS: 0.05 s), and answer from
# their fallbacks before this fires: a hedge would only meet the same Redis on another replica.
EXPECTED_LATENCY: Mapping[str, float] = {FEATURES: 0.1, SCORING: 0.05, RANKING: 0.1}


def internal_per_try_timeout(
    cluster: str,
    budgets: StageBudgets | None = None,
    deadline: float = DEFAULT_DEADLINE_SECONDS,
    expected: Mapping[str, float] = EXPECTED_LATENCY,
) -> str:
    """Per-try timeout (the hedging delay) of the gateway's calls to `cluster`: its expected
    latency, but never more than the shortest budget the gateway gives those calls in a
    request of the default deadline (gateway/budget.py) split so that every attempt (the
    first and each hedge) fits in it. The defaults give features 0.1 s, scoring 0.05 s,
    ranking 0.1 s."""
    budgets = budgets or StageBudgets()
    budget = min(budgets.shortest(stage, deadline) for stage in CLUSTER_STAGES[cluster])
    return duration(min(expected[cluster], budget / ATTEMPTS))


# Routes of the edge listener: clients call the gateway (REST or gRPC) and scoring (the Open
# Inference Protocol). Neither is hedged: a Recommend runs the whole pipeline, and a
# client's inference batch may rightly take long.
EDGE_ROUTE_LIMITS: Mapping[str, RouteLimits] = {
    # A caller with a long deadline whose gateway replica hangs gets a second try on
    # another one after 5 s (no sooner: a try cut short reruns the whole pipeline).
    GATEWAY: RouteLimits(duration(DEFAULT_DEADLINE_SECONDS), "10s", "5s"),
    SCORING: RouteLimits("5s", "5s", "2s"),
    # JobService's reads (GetJob); SubmitJob and CancelJob are NON_IDEMPOTENT_METHODS.
    JOBS: RouteLimits("5s", "10s", "5s"),
    # The Open Inference Protocol over HTTP: the same calls as scoring's gRPC ones. HTTP has
    # no grpc-timeout, so the default deadline is the route's timeout for every caller.
    http_cluster(SCORING): RouteLimits("5s", "5s", "2s"),
}
# Routes of the internal listeners: the gateway's calls, always with its stage's deadline.
INTERNAL_ROUTE_LIMITS: Mapping[str, RouteLimits] = {
    backend: RouteLimits("5s", "5s", internal_per_try_timeout(backend), hedged=True) for backend in BACKENDS
}


def route_limits(cluster: str, *, internal: bool) -> RouteLimits:
    return (INTERNAL_ROUTE_LIMITS if internal else EDGE_ROUTE_LIMITS)[cluster]


# Idempotent calls only: the retried call may already have run on the first replica.
# Every RPC of the mesh is a read (Recommend, GetFeatures, RetrieveCandidates, ModelInfer,
# the inference metadata/config/statistics calls, Rank), so this is the routes' default.
# `reset` covers a try cut off by its per-try timeout too.
IDEMPOTENT_RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
# The same for HTTP upstreams (the Open Inference Protocol over REST): a 503 is the
# service's UNAVAILABLE (docs/rest.md), e.g. a replica whose model is not loaded yet.
HTTP_IDEMPOTENT_RETRY_ON = "reset,connect-failure,refused-stream,retriable-status-codes"
HTTP_RETRIABLE_STATUS_CODES = (503,)
# Conditions where the request cannot have reached the application: safe for any RPC.
UNSENT_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
# RPCs that change state, per cluster: routed on their own, with no retry that could run
# them twice, and a timeout that leaves room for loading a model.
NON_IDEMPOTENT_METHODS: Mapping[str, tuple[str, ...]] = {
    SCORING: (
        f"/{HEALTH_SERVICE_NAMES[SCORING]}/RepositoryModelLoad",
        f"/{HEALTH_SERVICE_NAMES[SCORING]}/RepositoryModelUnload",
    ),
    JOBS: (f"/{HEALTH_SERVICE_NAMES[JOBS]}/SubmitJob", f"/{HEALTH_SERVICE_NAMES[JOBS]}/CancelJob"),
}
NON_IDEMPOTENT_TIMEOUT = "120s"
# Concurrent retries allowed, as a share of the cluster's active requests (and a floor, so
# a lightly loaded cluster can still retry every call of a replica that just died).
RETRY_BUDGET_PERCENT = 25.0
RETRY_BUDGET_MIN_CONCURRENCY = 16
# Circuit breakers, per cluster and Envoy process: beyond these, Envoy answers 503 at once
# (overflow) instead of queueing without bound. max_retries is left out: the budget
# replaces it.
CIRCUIT_BREAKERS: Mapping[str, int] = {
    "max_connections": 1024,
    "max_pending_requests": 1024,
    "max_requests": 4096,
}
# Outlier detection, tuned for a small mesh. Failures are split by origin:
# * local, a dead replica (connection refused, reset): two in a row eject it, so a killed
#   replica stops getting traffic within a couple of calls;
# * local, a hung replica (SIGSTOP: it accepts streams, never answers): every call that
#   reaches it is a per-try timeout, hedged elsewhere. Envoy counts each call's stream as
#   a local success before its timeout, so "in a row" never adds up: what ejects it is its
#   failure percentage, evaluated every second, which is exactly 50% when every call times
#   out (one success, one failure each) and below it while any call answers. Only in
#   clusters of 2 or more (a lone replica has nowhere to send its calls);
# * from the service (gRPC status): five UNAVAILABLE / DEADLINE_EXCEEDED in a row eject it
#   (a sick replica); INTERNAL, UNIMPLEMENTED... are about the request, not the replica,
#   so they are counted (stats) but never eject (a client could otherwise eject replicas).
# Ejection lasts 5 s, longer each time it happens again; a passing active health check
# (every second) readmits a replica sooner, so a replica that is merely having a bad
# moment is not kept out for long.
OUTLIER_DETECTION: Mapping[str, Any] = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 2,
    "enforcing_consecutive_local_origin_failure": 100,
    "failure_percentage_threshold": 50,
    "failure_percentage_minimum_hosts": 2,
    "failure_percentage_request_volume": 6,  # local events in the interval: three calls
    "enforcing_failure_percentage_local_origin": 100,
    "enforcing_failure_percentage": 0,  # the services' own errors: see consecutive_gateway_failure
    "consecutive_gateway_failure": 5,
    "enforcing_consecutive_gateway_failure": 100,
    "consecutive_5xx": 5,
    "enforcing_consecutive_5xx": 0,
    "interval": "1s",
    "base_ejection_time": "5s",
    "max_ejection_time": "60s",
    # Half the cluster at most: ejecting every replica would turn a partial outage into a
    # full one.
    "max_ejection_percent": 50,
}
HEALTH_CHECK_INTERVAL = "1s"
HEALTH_CHECK_TIMEOUT = "1s"


def retry_policy(retry_on: str, per_try_timeout: str | None = None) -> Json:
    policy: Json = {
        "retry_on": retry_on,
        "num_retries": NUM_RETRIES,
        # Short back-off: a local replica that refused a connection is not coming back
        # within milliseconds, the next one is a different replica (previous_hosts).
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": f"{EXTENSIONS_TYPE}.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }
    if per_try_timeout is not None:
        policy["per_try_timeout"] = per_try_timeout
    return policy


def health_check(service: str) -> Json:
    return {
        "timeout": HEALTH_CHECK_TIMEOUT,
        "interval": HEALTH_CHECK_INTERVAL,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        # Default is 60s while a cluster has seen no traffic: `infermesh up` would wait
        # a minute for readiness.
        "no_traffic_interval": HEALTH_CHECK_INTERVAL,
        "grpc_health_check": {"service_name": HEALTH_SERVICE_NAMES[service]},
    }


def http_health_check(path: str) -> Json:
    """An HTTP service's active health check: GET `path`, healthy on 200 (the Open Inference
    Protocol's /v2/health/ready answers 400 until every model is ready)."""
    return {
        "timeout": HEALTH_CHECK_TIMEOUT,
        "interval": HEALTH_CHECK_INTERVAL,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "no_traffic_interval": HEALTH_CHECK_INTERVAL,
        "http_health_check": {"path": path},
    }


def circuit_breakers() -> Json:
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                **CIRCUIT_BREAKERS,
                "retry_budget": {
                    "budget_percent": {"value": RETRY_BUDGET_PERCENT},
                    "min_retry_concurrency": RETRY_BUDGET_MIN_CONCURRENCY,
                },
                # circuit_breakers.default.remaining_* gauges: how close a cluster is.
                "track_remaining": True,
            }
        ]
    }


def health_gating() -> Json:
    """The clusters' common_lb_config: traffic goes to health-checked replicas only."""
    return {
        # 0: with every replica unhealthy, fail fast (503) rather than spray traffic
        # at NOT_SERVING replicas (Envoy's default panics below 50% healthy).
        "healthy_panic_threshold": {"value": 0.0},
        # Envoy batches health changes for 1 s by default (meant for huge clusters):
        # a NOT_SERVING replica would keep getting traffic that long.
        "update_merge_window": "0s",
    }
