"""Opt-in admission control at the edge (an `EdgePolicy`): a local rate limit (429 for
REST, RESOURCE_EXHAUSTED for gRPC) and API-key authentication (401 before any upstream
call), as the edge listener's first HTTP filters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infermesh.envoy.common import EXTENSIONS_TYPE, Json

API_KEY_HEADER = "x-api-key"
# Set by Envoy on authenticated requests: which client's key it was (the key itself is
# removed before the request goes upstream). Only to be trusted with API keys on.
CLIENT_ID_HEADER = "x-infermesh-client"
RATE_LIMIT_STAT_PREFIX = "edge_rate_limit"
_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
_API_KEY_FILTER = "envoy.filters.http.api_key_auth"
# Token refills, finest first: a smooth rate rather than one burst per second.
_FILL_INTERVALS_MS = (50, 100, 200, 250, 500, 1000)


@dataclass(frozen=True)
class ApiKey:
    client: str
    key: str


@dataclass(frozen=True)
class EdgePolicy:
    """Opt-in admission control at the edge listener; the default admits everything.

    rate_limit_rps: requests per second the edge admits (one token bucket for the whole
    Envoy process); beyond it REST gets 429 and gRPC RESOURCE_EXHAUSTED. None: no limit.
    rate_limit_burst: the bucket's size (default: one second's worth).
    api_keys: when non-empty, every request but health checks needs one of these keys,
    in `x-api-key` or `authorization: Bearer <key>`; others get 401 (gRPC UNAUTHENTICATED)
    from Envoy, without reaching a service.
    """

    rate_limit_rps: int | None = None
    rate_limit_burst: int | None = None
    api_keys: tuple[ApiKey, ...] = ()

    def __post_init__(self) -> None:
        if self.rate_limit_rps is not None and self.rate_limit_rps < 1:
            raise ValueError(f"edge rate limit must be at least 1 request/s, got {self.rate_limit_rps}")
        if self.rate_limit_burst is not None and self.rate_limit_burst < 1:
            raise ValueError(f"edge rate-limit burst must be at least 1, got {self.rate_limit_burst}")
        clients = [k.client for k in self.api_keys]
        if len(set(clients)) != len(clients):
            raise ValueError("API key clients must be unique")
        for api_key in self.api_keys:
            if not api_key.client or not api_key.key:
                raise ValueError("API keys need a client name and a non-empty key")


def parse_api_keys(text: str) -> tuple[ApiKey, ...]:
    """`client:key` per line; blank lines and `#` comments are skipped."""
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        client, sep, key = line.partition(":")
        if not sep or not client.strip() or not key.strip():
            raise ValueError(f"API key file line {number}: expected CLIENT:KEY")
        keys.append(ApiKey(client.strip(), key.strip()))
    if not keys:
        raise ValueError("the API key file holds no key")
    return tuple(keys)


def load_api_keys(path: Path) -> tuple[ApiKey, ...]:
    try:
        return parse_api_keys(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read API key file {path}: {error.strerror}") from None


def policy_filters(edge: EdgePolicy) -> list[Json]:
    """The HTTP filters `edge` adds, cheapest rejection first: over the limit, then no
    valid key (both before the request body is buffered)."""
    filters = [_rate_limit(edge)] if edge.rate_limit_rps is not None else []
    if edge.api_keys:
        filters.append(_api_key_auth(edge))
    return filters


def policy_filter_names(edge: EdgePolicy) -> list[str]:
    """Names of policy_filters(edge), for routes that must bypass them."""
    return [f["name"] for f in policy_filters(edge)]


def _rate_limit(edge: EdgePolicy) -> Json:
    rps = edge.rate_limit_rps
    assert rps is not None
    interval_ms = next(ms for ms in _FILL_INTERVALS_MS if rps * ms % 1000 == 0)
    always = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "name": _RATE_LIMIT_FILTER,
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": RATE_LIMIT_STAT_PREFIX,
            # One bucket for the whole Envoy process (all workers, all connections).
            "token_bucket": {
                "max_tokens": edge.rate_limit_burst or rps,
                "tokens_per_fill": rps * interval_ms // 1000,
                "fill_interval": f"{interval_ms / 1000:g}s",
            },
            # Runtime keys: an operator can switch it off or to shadow mode (enabled but
            # not enforced) through the admin /runtime_modify endpoint without a restart.
            "filter_enabled": {"runtime_key": "edge_rate_limit.enabled", "default_value": always},
            "filter_enforced": {"runtime_key": "edge_rate_limit.enforced", "default_value": always},
            # 429 for REST; a gRPC caller gets RESOURCE_EXHAUSTED instead of the UNAVAILABLE
            # that HTTP 429 maps to, so clients do not retry into the limit.
            "rate_limited_as_resource_exhausted": True,
            # x-ratelimit-limit / -remaining / -reset on every response.
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }


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
