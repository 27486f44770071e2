"""Traffic policy: route timeouts, retries, retry budgets, circuit breakers, outlier
detection and active health checks.

Every route gets a timeout that caps the caller's grpc-timeout, and retries on
UNAVAILABLE / reset / connect failure with a per-try timeout for the idempotent RPCs (all
of them but the model repository's load/unload); every cluster has a retry budget,
circuit breakers, outlier detection that ejects a failing replica within a couple of failed
calls, and a grpc.health.v1 check under the service's health name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from infermesh.envoy.common import EXTENSIONS_TYPE, Json
from services.runtime.topology import FEATURES, GATEWAY, HEALTH_SERVICE_NAMES, RANKING, SCORING

ROUTE_TIMEOUT = "10s"
# Per-route limits, by the cluster a route goes to: (route timeout, per-try timeout). The
# route timeout also caps the caller's grpc-timeout; the per-try timeout lets a hung
# replica's call be retried on another one while the caller's deadline still allows it.
ROUTE_TIMEOUTS: Mapping[str, tuple[str, str]] = {
    GATEWAY: (ROUTE_TIMEOUT, "5s"),
    FEATURES: ("5s", "2s"),
    SCORING: ("5s", "2s"),
    RANKING: ("5s", "2s"),
}
# Idempotent calls only: the retried call may already have run on the first replica.
# Every RPC of the mesh is a read (Recommend, GetFeatures, RetrieveCandidates, ModelInfer,
# the inference metadata/config/statistics calls, Rank), so this is the routes' default.
IDEMPOTENT_RETRY_ON = "unavailable,reset,connect-failure,refused-stream"
# Conditions where the request cannot have reached the application: safe for any RPC.
UNSENT_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
NUM_RETRIES = 2
# RPCs that change state, per cluster: routed on their own, with no retry that could run
# them twice, and a timeout that leaves room for loading a model.
NON_IDEMPOTENT_METHODS: Mapping[str, tuple[str, ...]] = {
    SCORING: (
        f"/{HEALTH_SERVICE_NAMES[SCORING]}/RepositoryModelLoad",
        f"/{HEALTH_SERVICE_NAMES[SCORING]}/RepositoryModelUnload",
    ),
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
# * local (connection refused, reset, per-try timeout: the replica is dead or hung): two
#   in a row eject it, so a killed replica stops getting traffic within a couple of calls;
# * from the service (gRPC status): five UNAVAILABLE / DEADLINE_EXCEEDED in a row eject it
#   (a sick replica); INTERNAL, UNIMPLEMENTED... are about the request, not the replica,
#   so they are counted (stats) but never eject (a client could otherwise eject replicas).
# Ejection lasts 5 s, longer each time it happens again; a passing active health check
# (every second) readmits a replica sooner, so a replica that is merely having a bad
# moment (or the only one) is not kept out for long.
OUTLIER_DETECTION: Mapping[str, Any] = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 2,
    "enforcing_consecutive_local_origin_failure": 100,
    "consecutive_gateway_failure": 5,
    "enforcing_consecutive_gateway_failure": 100,
    "consecutive_5xx": 5,
    "enforcing_consecutive_5xx": 0,
    "interval": "1s",
    "base_ejection_time": "5s",
    "max_ejection_time": "60s",
    # Half the cluster at most: ejecting every replica would turn a partial outage into a
    # full one (Envoy always allows the first ejection, even of a cluster's only replica).
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
                "typed_config": {
                    "@type": f"{EXTENSIONS_TYPE}.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
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
