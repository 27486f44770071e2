"""The Kubernetes Envoy config with an edge policy (docs/security.md, "JWT at the edge",
Kubernetes): the committed variant plus the policy's filters, nothing of the mesh's mTLS lost,
and the JWKS fetched over the identity provider's TLS, not the mesh's."""

from __future__ import annotations

from pathlib import Path

from infermesh import envoy, kubernetes
from infermesh.envoy import sds
from infermesh.envoy.edge_auth import JWKS_CLUSTER, JWT_FILTER, JwtAuth

JWT = JwtAuth(
    "https://idp.example.com",
    ("infermesh",),
    jwks_uri="https://idp.example.com/.well-known/jwks.json",
    jwks_ca_file=Path("/etc/ssl/certs/ca-certificates.crt"),
)


def _edge_filters(config: envoy.Json) -> list[str]:
    (edge,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "edge"]
    (chain,) = edge["filter_chains"]
    (hcm,) = chain["filters"]
    return [f["name"] for f in hcm["typed_config"]["http_filters"]]


def test_the_edge_policy_adds_its_filters_to_the_production_variant() -> None:
    committed = kubernetes.render_config("mtls")
    with_jwt = kubernetes.render_config("mtls", edge=envoy.EdgePolicy(jwt=JWT, caller_rate_limit_rps=50))
    assert JWT_FILTER not in _edge_filters(committed)
    assert JWT_FILTER in _edge_filters(with_jwt)
    # The mesh's mTLS is all there: every service's cluster and listener as committed.
    clusters = {c["name"]: c for c in with_jwt["static_resources"]["clusters"]}
    committed_clusters = {c["name"]: c for c in committed["static_resources"]["clusters"]}
    for name in sds.mtls_clusters(committed):
        assert clusters[name] == committed_clusters[name], name
    # The JWKS comes over the identity provider's TLS: its name, the image's CA bundle.
    jwks = clusters[JWKS_CLUSTER]["transport_socket"]["typed_config"]
    assert jwks["sni"] == "idp.example.com"
    assert str(JWT.jwks_ca_file) in envoy.to_json(jwks)
