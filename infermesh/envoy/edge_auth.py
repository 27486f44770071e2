"""JWT at the edge (a `JwtAuth`): Envoy's jwt_authn filter checks the token's signature
against a JSON Web Key Set (a local file, or an issuer's URI fetched and cached), its
issuer, audience, expiry (within a clock skew) and subject, and forwards the subject to the
services in a header of its own. And the early header mutation that removes the identity
headers from every incoming request, so that only the edge's own filters can set them.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway.caller import CLIENT_ID_HEADER, SUBJECT_HEADER
from infermesh.envoy.common import CONNECT_TIMEOUT, EXTENSIONS_TYPE, Json, socket_address
from infermesh.envoy.tls import san_matchers, tls_params, tls_socket

JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PROVIDER = "issuer"
JWKS_CLUSTER = "jwks"
JWKS_FETCH_TIMEOUT = "5s"
DEFAULT_JWKS_CACHE_S = 300
DEFAULT_CLOCK_SKEW_S = 60  # Envoy's own default
# Verified tokens kept (per worker) so a caller's next call skips the signature check.
JWT_CACHE_SIZE = 1000
IDENTITY_HEADERS = (CLIENT_ID_HEADER, SUBJECT_HEADER)


@dataclass(frozen=True)
class JwtAuth:
    """Bearer JWTs the edge accepts: signed by a key of the JWKS (`jwks_file`, or
    `jwks_uri` fetched and kept `jwks_cache_s` seconds; an https one's server must present
    a certificate for its host name signed by a CA of `jwks_ca_file`, see
    system_ca_bundle), `iss` equal to `issuer`, `aud` naming one of
    `audiences`, `exp` present and not past (nor `nbf` ahead) by more than
    `clock_skew_s`, and a non-empty `sub`, which the services get in SUBJECT_HEADER."""

    issuer: str
    audiences: tuple[str, ...]
    jwks_file: Path | None = None
    jwks_uri: str | None = None
    jwks_cache_s: int = DEFAULT_JWKS_CACHE_S
    clock_skew_s: int = DEFAULT_CLOCK_SKEW_S
    jwks_ca_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("JWT: the issuer must not be empty")
        if not self.audiences or not all(self.audiences):
            raise ValueError("JWT: name at least one audience (tokens for another service are refused)")
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ValueError("JWT: give the keys either as a JWKS file or as a JWKS URI, one of the two")
        if self.jwks_uri is not None:
            _jwks_address(self.jwks_uri)
        if self.jwks_cache_s < 1:
            raise ValueError(f"JWT: the JWKS cache duration must be at least 1 s, got {self.jwks_cache_s}")
        if self.clock_skew_s < 0:
            raise ValueError(f"JWT: the clock skew must be 0 s or more, got {self.clock_skew_s}")
        https = (self.jwks_uri or "").startswith("https://")
        if https != (self.jwks_ca_file is not None):
            raise ValueError("JWT: an https JWKS URI needs a CA file to check its server, and only one does")


def system_ca_bundle() -> Path:
    """The CA bundle OpenSSL trusts on this machine (SSL_CERT_FILE, else its default file):
    Envoy checks a JWKS server against a file, not the system's store."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    raise ValueError("no system CA bundle found: name the JWKS server's CA file")


def check_jwks_file(path: Path) -> Path:
    """`path` made absolute (Envoy runs elsewhere) once it reads as a JSON Web Key Set;
    ValueError names the file, never its content."""
    try:
        keys = json.loads(Path(path).read_text(encoding="utf-8")).get("keys")
    except OSError as error:
        raise ValueError(f"cannot read JWKS file {path}: {error.strerror}") from None
    except (ValueError, AttributeError):
        keys = None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f'JWKS file {path}: expected a JSON Web Key Set, {{"keys": [...]}} with at least one key')
    return Path(path).resolve()


def strip_identity_headers() -> Json:
    """The edge's early header mutation (before routing and every filter): a caller's own
    copy of an identity header is gone before authentication sets the real one."""
    return {
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.http.early_header_mutation.header_mutation.v3.HeaderMutation",
            "mutations": [{"remove": header} for header in IDENTITY_HEADERS],
        },
    }


def jwt_filter(jwt: JwtAuth, *, optional: bool) -> Json:
    """jwt_authn with one provider. `optional` (API keys accepted too): a request without a
    valid token goes on without a subject, for the API-key filter to decide."""
    provider: Json = {
        "issuer": jwt.issuer,
        "audiences": list(jwt.audiences),
        "require_expiration": True,
        # Every accepted token names its caller: logs, spans and per-caller limits need one.
        "subjects": {"safe_regex": {"regex": ".+"}},
        "clock_skew_seconds": jwt.clock_skew_s,
        # From the authorization header only (gRPC metadata alike), never a query
        # parameter, which the access log would print.
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False,  # the services get the subject, not the token
        "claim_to_headers": [{"header_name": SUBJECT_HEADER, "claim_name": "sub"}],
        "jwt_cache_config": {"jwt_cache_size": JWT_CACHE_SIZE},
    }
    if jwt.jwks_file is not None:
        provider["local_jwks"] = {"filename": str(jwt.jwks_file)}
    else:
        provider["remote_jwks"] = _remote_jwks(jwt)
    required: Json = {"provider_name": JWT_PROVIDER}
    if optional:
        required = {"requires_any": {"requirements": [required, {"allow_missing_or_failed": {}}]}}
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {JWT_PROVIDER: provider},
            # Every path; the health and OpenAPI routes switch the filter off.
            "rules": [{"match": {"prefix": "/"}, "requires": required}],
        },
    }


def skip_when_subject(filter_config: Json) -> Json:
    """`filter_config` skipped for requests whose JWT was verified (they carry a subject)."""
    subject = {
        "name": "subject",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": SUBJECT_HEADER,
        },
    }
    skip = {
        "name": "skip",
        "typed_config": {"@type": f"{EXTENSIONS_TYPE}.filters.common.matcher.action.v3.SkipFilter"},
    }
    matcher = {
        "predicate": {
            "single_predicate": {"input": subject, "value_match": {"safe_regex": {"google_re2": {}, "regex": ".+"}}}
        },
        "on_match": {"action": skip},
    }
    return {
        "name": filter_config["name"],
        "typed_config": {
            "@type": f"{EXTENSIONS_TYPE}.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": {"matcher_list": {"matchers": [matcher]}},
            "extension_config": filter_config,
        },
    }


def jwks_clusters(jwt: JwtAuth | None) -> list[Json]:
    """The cluster Envoy fetches a remote JWKS through (none for a JWKS file)."""
    if jwt is None or jwt.jwks_uri is None:
        return []
    https, host, port = _jwks_address(jwt.jwks_uri)
    cluster: Json = {
        "name": JWKS_CLUSTER,
        "type": "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": JWKS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}],
        },
    }
    if https:
        cluster["transport_socket"] = _jwks_tls(host, jwt.jwks_ca_file)
    return [cluster]


def _remote_jwks(jwt: JwtAuth) -> Json:
    assert jwt.jwks_uri is not None
    return {
        "http_uri": {"uri": jwt.jwks_uri, "cluster": JWKS_CLUSTER, "timeout": JWKS_FETCH_TIMEOUT},
        "cache_duration": f"{jwt.jwks_cache_s}s",
        # Fetched at start-up and on expiry in the background: no request waits for it,
        # and a failed fetch is tried again (every second) rather than at the next request.
        "async_fetch": {"fast_listener": False},
        "retry_policy": {"num_retries": 3, "retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"}},
    }


def _jwks_tls(host: str, ca_file: Path | None) -> Json:
    assert ca_file is not None
    validation = {"trusted_ca": {"filename": str(ca_file)}, "match_typed_subject_alt_names": san_matchers([host])}
    common = {"tls_params": tls_params(), "validation_context": validation}
    return tls_socket("UpstreamTlsContext", {"sni": host, "common_tls_context": common})


def _jwks_address(uri: str) -> tuple[bool, str, int]:
    """(https?, host, port) of a JWKS URI; ValueError unless it is http(s)://host[:port]/..."""
    problem = ValueError("JWT: the JWKS URI must be http(s)://HOST[:PORT]/PATH, without credentials")
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError:
        raise problem from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise problem
    https = parts.scheme == "https"
    return https, parts.hostname, port or (443 if https else 80)
