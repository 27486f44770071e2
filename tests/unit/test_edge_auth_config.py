"""The rendered edge's JWT authentication, identity headers and per-caller rate limit (no
Envoy binary needed; tests/integration/test_edge_jwt.py runs them in the real one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.caller import CLIENT_ID_HEADER, SUBJECT_HEADER
from infermesh import envoy
from infermesh.envoy import cli as envoy_cli
from infermesh.envoy.edge_auth import JWKS_CLUSTER, JWT_FILTER, JwtAuth, check_jwks_file
from infermesh.envoy.edge_policy import ApiKey, EdgePolicy
from services.runtime.topology import local_topology

DESCRIPTOR = Path("services/genproto/infermesh_descriptor.binpb")
HCM = "envoy.filters.network.http_connection_manager"
RATE_LIMIT = "envoy.filters.http.local_ratelimit"
CALLER_RATE_LIMIT = "infermesh.edge_caller_rate_limit"
API_KEY_AUTH = "envoy.filters.http.api_key_auth"
KEYS = (ApiKey("bob", "k-bob"),)
ISSUER = "https://idp.example"


def _jwt(**overrides: Any) -> JwtAuth:
    fields: dict[str, Any] = {"issuer": ISSUER, "audiences": ("infermesh",), "jwks_file": Path("/keys/jwks.json")}
    return JwtAuth(**{**fields, **overrides})


def _edge_hcm(edge: EdgePolicy) -> dict[str, Any]:
    config = envoy.render(local_topology(descriptor_set=DESCRIPTOR), edge=edge)
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "edge"]
    (chain,) = listener["filter_chains"]
    (hcm,) = [f for f in chain["filters"] if f["name"] == HCM]
    return hcm["typed_config"]


def _filters(edge: EdgePolicy) -> dict[str, dict[str, Any]]:
    return {f["name"]: f["typed_config"] for f in _edge_hcm(edge)["http_filters"]}


def _clusters(edge: EdgePolicy) -> dict[str, dict[str, Any]]:
    config = envoy.render(local_topology(descriptor_set=DESCRIPTOR), edge=edge)
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_every_edge_strips_the_identity_headers_before_anything_else() -> None:
    for edge in (EdgePolicy(), EdgePolicy(api_keys=KEYS), EdgePolicy(jwt=_jwt())):
        (mutation,) = _edge_hcm(edge)["early_header_mutation_extensions"]
        assert mutation["typed_config"]["mutations"] == [{"remove": CLIENT_ID_HEADER}, {"remove": SUBJECT_HEADER}]


def test_jwt_provider_checks_issuer_audience_expiry_and_subject() -> None:
    jwt = _jwt(audiences=("infermesh", "mobile"), clock_skew_s=5)
    filters = _filters(EdgePolicy(jwt=jwt))
    assert API_KEY_AUTH not in filters
    authn = filters[JWT_FILTER]
    (provider,) = authn["providers"].values()
    assert provider["issuer"] == ISSUER and provider["audiences"] == ["infermesh", "mobile"]
    assert provider["require_expiration"] is True and provider["clock_skew_seconds"] == 5
    assert provider["subjects"] == {"safe_regex": {"regex": ".+"}}
    assert provider["local_jwks"] == {"filename": "/keys/jwks.json"}
    # The header only, never a query parameter the access log would print; the token stays at the edge.
    assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]
    assert provider["forward"] is False
    assert provider["claim_to_headers"] == [{"header_name": SUBJECT_HEADER, "claim_name": "sub"}]
    (rule,) = authn["rules"]
    assert rule == {"match": {"prefix": "/"}, "requires": {"provider_name": "issuer"}}
    assert JWKS_CLUSTER not in _clusters(EdgePolicy(jwt=jwt))


def test_either_lets_a_verified_token_skip_the_api_key_filter() -> None:
    edge = EdgePolicy(api_keys=KEYS, jwt=_jwt())
    assert edge.accepts == "either"
    filters = _filters(edge)
    assert list(filters)[:2] == [JWT_FILTER, API_KEY_AUTH]
    (rule,) = filters[JWT_FILTER]["rules"]
    assert rule["requires"]["requires_any"]["requirements"] == [
        {"provider_name": "issuer"},
        {"allow_missing_or_failed": {}},
    ]
    wrapped = filters[API_KEY_AUTH]
    assert wrapped["@type"].endswith("ExtensionWithMatcher")
    assert wrapped["extension_config"]["typed_config"]["credentials"] == [{"key": "k-bob", "client": "bob"}]
    (matcher,) = wrapped["xds_matcher"]["matcher_list"]["matchers"]
    predicate = matcher["predicate"]["single_predicate"]
    assert predicate["input"]["typed_config"]["header_name"] == SUBJECT_HEADER
    assert matcher["on_match"]["action"]["typed_config"]["@type"].endswith("SkipFilter")


def test_remote_jwks_gets_a_cluster_checked_by_host_name() -> None:
    ca = Path("/etc/ca.pem")
    jwt = _jwt(jwks_file=None, jwks_uri="https://idp.example:8443/keys", jwks_cache_s=120, jwks_ca_file=ca)
    edge = EdgePolicy(jwt=jwt)
    (provider,) = _filters(edge)[JWT_FILTER]["providers"].values()
    remote = provider["remote_jwks"]
    assert remote["http_uri"] == {"uri": "https://idp.example:8443/keys", "cluster": JWKS_CLUSTER, "timeout": "5s"}
    assert remote["cache_duration"] == "120s" and remote["async_fetch"] == {"fast_listener": False}
    cluster = _clusters(edge)[JWKS_CLUSTER]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address == {"socket_address": {"address": "idp.example", "port_value": 8443}}
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "idp.example"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": str(ca)}
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "idp.example"}}]
    plain = EdgePolicy(jwt=_jwt(jwks_file=None, jwks_uri="http://127.0.0.1/jwks.json"))
    assert "transport_socket" not in _clusters(plain)[JWKS_CLUSTER]


def test_jwt_refusals_of_envoys_own_are_401_not_403() -> None:
    def rewrites(edge: EdgePolicy) -> list[dict[str, Any]]:
        return [m for m in _edge_hcm(edge)["local_reply_config"]["mappers"] if m.get("status_code") == 401]

    assert rewrites(EdgePolicy(api_keys=KEYS)) == []
    oip, rest, grpc = rewrites(EdgePolicy(jwt=_jwt()))
    assert oip["body_format_override"]["json_format"] == {"error": "%LOCAL_REPLY_BODY%"}  # /v2's own error shape
    assert rest["body_format_override"]["json_format"]["code"] == 16
    assert (
        rest["filter"]["and_filter"]["filters"][0]["status_code_filter"]["comparison"]["value"]["default_value"] == 403
    )
    assert grpc["headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "16"}


def test_caller_rate_limit_keeps_a_bucket_per_client_and_per_subject() -> None:
    edge = EdgePolicy(
        rate_limit_rps=100, api_keys=KEYS, jwt=_jwt(), caller_rate_limit_rps=10, caller_rate_limit_burst=30
    )
    filters = _filters(edge)
    # The edge's limit first (cheapest), then who called, then that caller's own limit.
    assert list(filters)[:4] == [RATE_LIMIT, JWT_FILTER, API_KEY_AUTH, CALLER_RATE_LIMIT]
    caller = filters[CALLER_RATE_LIMIT]
    assert "token_bucket" not in caller  # no bucket shared by every caller
    bucket = {"max_tokens": 30, "tokens_per_fill": 1, "fill_interval": "0.1s"}
    assert caller["descriptors"] == [
        {"entries": [{"key": "api_key_client", "value": ""}], "token_bucket": bucket},
        {"entries": [{"key": "jwt_subject", "value": ""}], "token_bucket": bucket},
    ]
    actions = [limit["actions"] for limit in caller["rate_limits"]]
    assert actions == [
        [{"request_headers": {"header_name": CLIENT_ID_HEADER, "descriptor_key": "api_key_client"}}],
        [{"request_headers": {"header_name": SUBJECT_HEADER, "descriptor_key": "jwt_subject"}}],
    ]
    assert caller["rate_limited_as_resource_exhausted"] is True and caller["max_dynamic_descriptors"] >= 1000
    # One set of x-ratelimit headers: the caller's.
    assert "enable_x_ratelimit_headers" not in filters[RATE_LIMIT] and caller["enable_x_ratelimit_headers"]
    # Health checks and the API description are spared, like the other policy filters.
    (vhost,) = _edge_hcm(edge)["route_config"]["virtual_hosts"]
    health = vhost["routes"][0]
    assert {JWT_FILTER, API_KEY_AUTH, CALLER_RATE_LIMIT} <= set(health["typed_per_filter_config"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"caller_rate_limit_rps": 5}, "needs callers"),
        ({"api_keys": KEYS, "caller_rate_limit_burst": 5}, "needs a per-caller rate limit"),
        ({"api_keys": KEYS, "caller_rate_limit_rps": 0}, "at least 1 request/s"),
        ({"auth": "jwt", "api_keys": KEYS}, "'jwt' takes no API keys"),
        ({"auth": "jwt"}, "'jwt' needs JWT"),
        ({"auth": "either", "jwt": _jwt()}, "'either' needs API keys"),
        ({"auth": "api-key", "api_keys": KEYS, "jwt": _jwt()}, "'api-key' takes no JWT"),
    ],
)
def test_bad_auth_policies_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EdgePolicy(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"issuer": ""}, "issuer"),
        ({"audiences": ()}, "audience"),
        ({"jwks_uri": "https://idp.example/keys"}, "one of the two"),
        ({"jwks_file": None}, "one of the two"),
        ({"jwks_file": None, "jwks_uri": "ftp://idp.example/keys"}, "http"),
        ({"jwks_file": None, "jwks_uri": "https://user:secret@idp.example/keys"}, "without credentials"),
        ({"jwks_file": None, "jwks_uri": "https://idp.example:99999/keys"}, "JWKS URI"),
        ({"jwks_file": None, "jwks_uri": "https://idp.example/keys"}, "CA file"),
        ({"clock_skew_s": -1}, "clock skew"),
        ({"jwks_cache_s": 0}, "cache"),
    ],
)
def test_bad_jwt_settings_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as failure:
        _jwt(**overrides)
    assert "secret" not in str(failure.value)


def test_a_jwks_file_must_hold_keys_and_its_content_is_never_quoted(tmp_path: Path) -> None:
    good = tmp_path / "jwks.json"
    good.write_text(json.dumps({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}))
    assert check_jwks_file(good) == good.resolve()
    for text in ("not json: s3cret", json.dumps({"keys": []}), json.dumps(["s3cret"])):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match="JSON Web Key Set") as failure:
            check_jwks_file(bad)
        assert "s3cret" not in str(failure.value)
    with pytest.raises(ValueError, match="cannot read"):
        check_jwks_file(tmp_path / "missing.json")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    envoy_cli.add_edge_arguments(parser)
    return parser.parse_args(list(argv))


def test_edge_flags_make_the_policy(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}))
    argv = ["--jwt-issuer", ISSUER, "--jwt-audience", "a", "--jwt-audience", "b", "--jwt-jwks-file", str(jwks)]
    edge = envoy_cli.edge_policy_from_args(_args(*argv, "--jwt-clock-skew", "10", "--edge-caller-rate-limit", "7"))
    assert edge.jwt == JwtAuth(ISSUER, ("a", "b"), jwks_file=jwks.resolve(), clock_skew_s=10)
    assert edge.accepts == "jwt" and edge.caller_rate_limit_rps == 7
    remote = envoy_cli.edge_policy_from_args(
        _args("--jwt-issuer", ISSUER, "--jwt-audience", "a", "--jwt-jwks-uri", "https://idp.example/keys")
    )
    assert remote.jwt is not None and remote.jwt.jwks_ca_file is not None  # the system's bundle


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--jwt-audience", "a"], "need --jwt-issuer"),
        (["--edge-caller-rate-burst", "3"], "needs --edge-caller-rate-limit"),
        (["--edge-caller-rate-limit", "3"], "needs callers"),
        (
            ["--edge-auth", "either", "--jwt-issuer", ISSUER, "--jwt-audience", "a", "--jwt-jwks-uri", "http://h/k"],
            "API keys",
        ),
    ],
)
def test_bad_edge_flags_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        envoy_cli.edge_policy_from_args(_args(*argv))
