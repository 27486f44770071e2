"""Admission control at the edge (an `EdgePolicy`): load shedding by adaptive concurrency
(on by default), and opt-in a local rate limit for the whole edge and one per caller (429
for REST, RESOURCE_EXHAUSTED for gRPC) and authentication by API key, JWT or either (401 /
UNAUTHENTICATED before any upstream call)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.caller import CLIENT_ID_HEADER, SUBJECT_HEADER
from infermesh.envoy.common import EXTENSIONS_TYPE, Json
from infermesh.envoy.edge_auth import JwtAuth, jwt_filter, skip_when_subject

API_KEY_HEADER = "x-api-key"
# Set by Envoy on authenticated requests, and removed from every incoming one first
# (edge_auth.strip_identity_headers): which client's key it was (CLIENT_ID_HEADER; the key
# itself is removed before the request goes upstream) or the verified JWT's subject
# (SUBJECT_HEADER; the token is removed too). Both names are the gateway's (gateway.caller).
RATE_LIMIT_STAT_PREFIX = "edge_rate_limit"
CALLER_RATE_LIMIT_STAT_PREFIX = "edge_caller_rate_limit"
_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
# A second local rate limit filter, after authentication: named apart from the first.
_CALLER_RATE_LIMIT_FILTER = "infermesh.edge_caller_rate_limit"
_API_KEY_FILTER = "envoy.filters.http.api_key_auth"
# Rate-limit descriptor keys: API-key clients and JWT subjects never share a bucket.
_CLIENT_DESCRIPTOR = "api_key_client"
_SUBJECT_DESCRIPTOR = "jwt_subject"
# Callers whose buckets Envoy keeps (least recently seen dropped first; one that comes back
# starts with a full bucket).
MAX_TRACKED_CALLERS = 10_000
# What the edge accepts: "api-key", "jwt", or "either".
EdgeAuth = Literal["api-key", "jwt", "either"]
EDGE_AUTH_CHOICES: tuple[EdgeAuth, ...] = ("api-key", "jwt", "either")
# Token refills, finest first: a smooth rate rather than one burst per second.
_FILL_INTERVALS_MS = (50, 100, 200, 250, 500, 1000)
ADMISSION_FILTER = "envoy.filters.http.adaptive_concurrency"
ADMISSION_RUNTIME_KEY = "edge_admission.enabled"
# Load shedding: Envoy's adaptive concurrency filter (gradient controller) over the gateway's
# routes. Every 100 ms it moves its limit on Recommend calls in flight by the ratio of the
# latency target to the median latency of the calls that ended in those 100 ms (x0.5 to
# x2): up while calls answer within the target, down once they queue past it, never below
# the floor nor above the ceiling. Beyond the limit a call is answered at once, without
# reaching the gateway: 429 / RESOURCE_EXHAUSTED.
# The target is fixed (Envoy's `fixed_value` minRTT, no buffer) rather than measured:
# measuring it would pin the limit to a handful of calls for a moment every interval,
# shedding bursts a healthy mesh answers in time.
DEFAULT_ADMISSION_LATENCY_MS = 40  # the mesh's median is ~10 ms on 2 cores (200 candidates)
# Calls in flight always admitted: bursts (a client's batch of concurrent calls, the
# gateway's coalescing) and a slow dependency at the usual rate are not overload. Under
# overload the limit sits here, which trades admitted latency for goodput nearly one for
# one: the gateway coalesces what is in flight into each stage's call, so fewer calls in
# flight make smaller batches, not faster ones. Measured with `infermesh chaos --only
# overload-8x` (docs/reliability.md): 12 in flight cut the admitted p99 by ~30% and the
# goodput by ~40% against 32.
ADMISSION_MIN_CONCURRENCY = 32
# The most a healthy mesh admits at once. Not more: when overload starts the limit is
# here and halves at best every interval, and what it admits meanwhile queues (with 256,
# an 8x overload's first 100 ms admitted ~50 calls that then waited ~0.6 s).
ADMISSION_MAX_CONCURRENCY = 64
ADMISSION_UPDATE_INTERVAL = "0.1s"


@dataclass(frozen=True)
class ApiKey:
    client: str
    key: str


@dataclass(frozen=True)
class EdgePolicy:
    """Admission control at the edge listener; by default only load shedding.

    rate_limit_rps: requests per second the edge admits (one token bucket for the whole
    Envoy process); beyond it REST gets 429 and gRPC RESOURCE_EXHAUSTED. None: no limit.
    rate_limit_burst: the bucket's size (default: one second's worth).
    api_keys: when non-empty, every request but health checks needs one of these keys,
    in `x-api-key` or `authorization: Bearer <key>`; others get 401 (gRPC UNAUTHENTICATED)
    from Envoy, without reaching a service.
    jwt: bearer JWTs the edge accepts instead (see JwtAuth); others get 401 likewise.
    auth: which of the two the edge accepts ("api-key", "jwt", "either"); None: what is
    configured, either when both are.
    caller_rate_limit_rps / _burst: requests per second each caller (API-key client or JWT
    subject) gets, in a bucket of its own, so one caller cannot starve the others; needs
    authentication. Within the edge's own limit, if any.
    admission_latency_ms: shed load to the gateway once its calls' median latency passes
    this target (beyond ADMISSION_MIN_CONCURRENCY calls in flight): REST gets 429 and gRPC
    RESOURCE_EXHAUSTED at once. None: no load shedding.
    """

    rate_limit_rps: int | None = None
    rate_limit_burst: int | None = None
    api_keys: tuple[ApiKey, ...] = ()
    admission_latency_ms: int | None = DEFAULT_ADMISSION_LATENCY_MS
    jwt: JwtAuth | None = None
    auth: EdgeAuth | None = None
    caller_rate_limit_rps: int | None = None
    caller_rate_limit_burst: int | None = None

    def __post_init__(self) -> None:
        _check_rate("edge", self.rate_limit_rps, self.rate_limit_burst)
        _check_rate("per-caller", self.caller_rate_limit_rps, self.caller_rate_limit_burst)
        clients = [k.client for k in self.api_keys]
        if len(set(clients)) != len(clients):
            raise ValueError("API key clients must be unique")
        for api_key in self.api_keys:
            if not api_key.client or not api_key.key:
                raise ValueError("API keys need a client name and a non-empty key")
        if self.admission_latency_ms is not None and self.admission_latency_ms < 1:
            raise ValueError(f"the load-shedding latency target must be at least 1 ms, got {self.admission_latency_ms}")
        self._check_auth()

    def _check_auth(self) -> None:
        if self.auth is not None and self.auth not in EDGE_AUTH_CHOICES:
            raise ValueError(f"edge authentication must be one of {', '.join(EDGE_AUTH_CHOICES)}")
        if self.auth is not None:
            keys_needed, jwt_needed = self.auth != "jwt", self.auth != "api-key"
            if keys_needed != bool(self.api_keys):
                raise ValueError(f"edge authentication {self.auth!r} {'needs' if keys_needed else 'takes no'} API keys")
            if jwt_needed != (self.jwt is not None):
                raise ValueError(
                    f"edge authentication {self.auth!r} {'needs' if jwt_needed else 'takes no'} JWT settings"
                )
        if self.caller_rate_limit_rps is not None and self.accepts is None:
            raise ValueError("a per-caller rate limit needs callers: API keys or JWT at the edge")

    @property
    def accepts(self) -> EdgeAuth | None:
        """What the edge accepts, None: no authentication."""
        if self.auth is not None:
            return self.auth
        if self.api_keys and self.jwt is not None:
            return "either"
        if self.jwt is not None:
            return "jwt"
        return "api-key" if self.api_keys else None


def _check_rate(what: str, rps: int | None, burst: int | None) -> None:
    if rps is not None and rps < 1:
        raise ValueError(f"{what} rate limit must be at least 1 request/s, got {rps}")
    if burst is not None and burst < 1:
        raise ValueError(f"{what} rate-limit burst must be at least 1, got {burst}")
    if burst is not None and rps is None:
        raise ValueError(f"a {what} rate-limit burst needs a {what} rate limit")


def parse_api_keys(text: str) -> tuple[ApiKey, ...]:
    """`client:key` per line; blank lines and `#` comments are skipped."""
    keys = []
    first_line: dict[str, int] = {}  # key -> the line it was first given on
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        client, sep, key = line.partition(":")
        if not sep or not client.strip() or not key.strip():
            raise ValueError(f"API key file line {number}: expected CLIENT:KEY")
        key = key.strip()
        if key in first_line:  # one key, two clients: a request could not say which one called
            raise ValueError(f"API key file line {number}: the key of line {first_line[key]} again; one key per client")
        first_line[key] = number
        keys.append(ApiKey(client.strip(), key))
    if not keys:
        raise ValueError("the API key file holds no key")
    return tuple(keys)


def load_api_keys(path: Path) -> tuple[ApiKey, ...]:
    try:
        return parse_api_keys(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read API key file {path}: {error.strerror}") from None


def policy_filters(edge: EdgePolicy) -> list[Json]:
    """The HTTP filters `edge` adds, cheapest rejection first: over the edge's limit, then
    no valid token or key, then over the caller's own limit (which needs to know the
    caller); all before the request body is buffered."""
    filters = [_edge_rate_limit(edge)] if edge.rate_limit_rps is not None else []
    accepts = edge.accepts
    if edge.jwt is not None and accepts in ("jwt", "either"):
        filters.append(jwt_filter(edge.jwt, optional=accepts == "either"))
    if edge.api_keys and accepts in ("api-key", "either"):
        # Either: a request whose token was verified needs no key.
        api_keys = _api_key_auth(edge)
        filters.append(skip_when_subject(api_keys) if accepts == "either" else api_keys)
    if edge.caller_rate_limit_rps is not None:
        filters.append(_caller_rate_limit(edge))
    return filters


def policy_filter_names(edge: EdgePolicy) -> list[str]:
    """Names of policy_filters(edge), for routes that must bypass them."""
    return [f["name"] for f in policy_filters(edge)]


def admission_filters(edge: EdgePolicy) -> list[Json]:
    """The load-shedding filter, if `edge` has it: after the request is buffered, so that the
    latency it measures is the gateway's, not the client's upload. Only the routes to the
    gateway's Recommend keep it (admission_filter_names: every other route is exempt)."""
    if edge.admission_latency_ms is None:
        return []
    controller = {
        "sample_aggregate_percentile": {"value": 50},
        "concurrency_limit_params": {
            "concurrency_update_interval": ADMISSION_UPDATE_INTERVAL,
            "max_concurrency_limit": ADMISSION_MAX_CONCURRENCY,
        },
        "min_rtt_calc_params": {
            "fixed_value": f"{edge.admission_latency_ms / 1000:g}s",
            "buffer": {"value": 0},
            "min_concurrency": ADMISSION_MIN_CONCURRENCY,
        },
    }
    return [
        {
            "name": ADMISSION_FILTER,
            "typed_config": {
                "@type": f"{EXTENSIONS_TYPE}.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency",
                "gradient_controller_config": controller,
                # An operator can switch it off without a restart (admin /runtime_modify).
                "enabled": {"default_value": True, "runtime_key": ADMISSION_RUNTIME_KEY},
                # Not Envoy's default 503: that would read as UNAVAILABLE, which clients retry.
                "concurrency_limit_exceeded_status": {"code": 429},
            },
        }
    ]


def admission_filter_names(edge: EdgePolicy) -> list[str]:
    return [f["name"] for f in admission_filters(edge)]


def _token_bucket(rps: int, burst: int | None) -> Json:
    interval_ms = next(ms for ms in _FILL_INTERVALS_MS if rps * ms % 1000 == 0)
    return {
        "max_tokens": burst or rps,
        "tokens_per_fill": rps * interval_ms // 1000,
        "fill_interval": f"{interval_ms / 1000:g}s",
    }


def _local_rate_limit(stat_prefix: str, headers: bool) -> Json:
    always = {"numerator": 100, "denominator": "HUNDRED"}
    config: Json = {
        "@type": f"{EXTENSIONS_TYPE}.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": stat_prefix,
        # Runtime keys: an operator can switch it off or to shadow mode (enabled but
        # not enforced) through the admin /runtime_modify endpoint without a restart.
        "filter_enabled": {"runtime_key": f"{stat_prefix}.enabled", "default_value": always},
        "filter_enforced": {"runtime_key": f"{stat_prefix}.enforced", "default_value": always},
        # 429 for REST; a gRPC caller gets RESOURCE_EXHAUSTED instead of the UNAVAILABLE
        # that HTTP 429 maps to, so clients do not retry into the limit.
        "rate_limited_as_resource_exhausted": True,
    }
    if headers:  # x-ratelimit-limit / -remaining / -reset on every response.
        config["enable_x_ratelimit_headers"] = "DRAFT_VERSION_03"
    return config


def _edge_rate_limit(edge: EdgePolicy) -> Json:
    assert edge.rate_limit_rps is not None
    # The caller's limit, if any, is the one a caller meets first: its headers win.
    config = _local_rate_limit(RATE_LIMIT_STAT_PREFIX, headers=edge.caller_rate_limit_rps is None)
    # One bucket for the whole Envoy process (all workers, all connections).
    config["token_bucket"] = _token_bucket(edge.rate_limit_rps, edge.rate_limit_burst)
    return {"name": _RATE_LIMIT_FILTER, "typed_config": config}


def _caller_rate_limit(edge: EdgePolicy) -> Json:
    """A bucket per API-key client and per JWT subject (Envoy's dynamic descriptors: an
    empty value matches every value, each with a bucket of its own), no shared one."""
    assert edge.caller_rate_limit_rps is not None
    bucket = _token_bucket(edge.caller_rate_limit_rps, edge.caller_rate_limit_burst)
    keyed = {CLIENT_ID_HEADER: _CLIENT_DESCRIPTOR, SUBJECT_HEADER: _SUBJECT_DESCRIPTOR}
    config = _local_rate_limit(CALLER_RATE_LIMIT_STAT_PREFIX, headers=True)
    config["descriptors"] = [{"entries": [{"key": key, "value": ""}], "token_bucket": bucket} for key in keyed.values()]
    # A request carries one identity header at most (set by authentication): the
    # descriptor of the other is not made, nor any without one.
    config["rate_limits"] = [
        {"actions": [{"request_headers": {"header_name": header, "descriptor_key": key}}]}
        for header, key in keyed.items()
    ]
    config["max_dynamic_descriptors"] = MAX_TRACKED_CALLERS
    return {"name": _CALLER_RATE_LIMIT_FILTER, "typed_config": config}


def _api_key_auth(edge: EdgePolicy) -> Json:
    return {
        "name": _API_KEY_FILTER,
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": k.key, "client": k.client} for k in edge.api_keys],
            # gRPC metadata and HTTP headers alike; "Bearer " is stripped from authorization.
            "key_sources": [{"header": API_KEY_HEADER}, {"header": "authorization"}],
            # Services learn who called, never the key.
            "forwarding": {"header": CLIENT_ID_HEADER, "hide_credentials": True},
        },
    }
