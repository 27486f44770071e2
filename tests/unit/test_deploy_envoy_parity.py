"""The local (`infermesh up`) and Kubernetes Envoy configs come from one renderer and agree.

Both are rendered here by infermesh.envoy.render; the Kubernetes one differs
only where the topology says it must (addresses, discovery, listen host, descriptor path),
and the committed ConfigMap sources under deploy/ equal a fresh rendering.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from infermesh import envoy, kubernetes
from services.runtime.topology import (
    BACKENDS,
    DEFAULT_EDGE_PORT,
    DEFAULT_INTERNAL_PORTS,
    HEALTH_SERVICE_NAMES,
    HTTP_SERVICES,
    SERVICES,
    http_cluster,
)

Json = dict[str, Any]
HCM = "envoy.filters.network.http_connection_manager"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


@pytest.fixture(scope="module")
def local() -> Json:
    # `infermesh up --otlp-endpoint` adds the tracer the Kubernetes config always has.
    return envoy.render(envoy.local_config_topology(), tracing=kubernetes.TRACING)


@pytest.fixture(scope="module")
def k8s() -> Json:
    return kubernetes.render_config("plain")


def _listeners(config: Json) -> dict[str, Json]:
    return {x["name"]: x for x in config["static_resources"]["listeners"]}


def _clusters(config: Json) -> dict[str, Json]:
    """The services' clusters (not the trace collector's)."""
    return {c["name"]: c for c in config["static_resources"]["clusters"] if c["name"] != envoy.COLLECTOR_CLUSTER}


def _hcm(listener: Json) -> Json:
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == HCM
    return network_filter["typed_config"]


def _routes(config: Json) -> dict[str, list[tuple[str, str]]]:
    """listener -> [(path prefix, or `=path` for an exact match, cluster)] in match order,
    for the routes to a cluster (not those Envoy answers itself)."""
    out = {}
    for name, listener in _listeners(config).items():
        (vhost,) = _hcm(listener)["route_config"]["virtual_hosts"]
        out[name] = [
            (r["match"].get("prefix") or f"={r['match']['path']}", r["route"]["cluster"])
            for r in vhost["routes"]
            if "route" in r
        ]
    return out


def _health_names(config: Json) -> dict[str, str]:
    """cluster -> what its health check asks: the gRPC health name, or the HTTP path."""
    checks = {name: cluster["health_checks"][0] for name, cluster in _clusters(config).items()}
    return {
        name: check["grpc_health_check"]["service_name"]
        if "grpc_health_check" in check
        else check["http_health_check"]["path"]
        for name, check in checks.items()
    }


def _endpoints(cluster: Json) -> list[tuple[str, int]]:
    return [
        (
            lb["endpoint"]["address"]["socket_address"]["address"],
            lb["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for locality in cluster["load_assignment"]["endpoints"]
        for lb in locality["lb_endpoints"]
    ]


def _ports(config: Json) -> dict[str, int]:
    return {name: listener["address"]["socket_address"]["port_value"] for name, listener in _listeners(config).items()}


# ------------------------------------------------------------------- same services


def test_same_clusters_one_per_service(local: Json, k8s: Json) -> None:
    # One per service, plus one per HTTP port (scoring's Open Inference Protocol over REST).
    expected = [*SERVICES, *(http_cluster(name) for name in HTTP_SERVICES)]
    assert list(_clusters(local)) == list(_clusters(k8s)) == expected


def test_same_listeners_and_ports(local: Json, k8s: Json) -> None:
    expected = {"edge": DEFAULT_EDGE_PORT, **DEFAULT_INTERNAL_PORTS}
    assert _ports(local) == _ports(k8s) == expected
    assert set(BACKENDS) <= set(_listeners(k8s))


def test_same_routes(local: Json, k8s: Json) -> None:
    routes = _routes(k8s)
    assert routes == _routes(local)
    scoring = HEALTH_SERVICE_NAMES["scoring"]
    # State-changing RPCs and streams have routes of their own (never retried once sent).
    own_routes = [(f"=/{scoring}/RepositoryModel{verb}", "scoring") for verb in ("Load", "Unload")]
    own_routes.append((f"=/{scoring}/ModelStreamInfer", "scoring"))
    assert routes["edge"] == [
        ("/grpc.health.v1.Health/", "gateway"),
        *own_routes,
        (f"/{scoring}/", "scoring"),
        ("=/v2", "scoring_http"),
        ("/v2/", "scoring_http"),
        *[(f"=/{HEALTH_SERVICE_NAMES['jobs']}/{rpc}", "jobs") for rpc in ("SubmitJob", "CancelJob")],
        (f"/{HEALTH_SERVICE_NAMES['jobs']}/", "jobs"),
        ("/", "gateway"),
    ]
    for backend in BACKENDS:
        # With a tracer every listener has a health route of its own (never traced).
        health = ("/grpc.health.v1.Health/", backend)
        assert routes[backend] == [health, *(own_routes if backend == "scoring" else []), ("/", backend)]


def test_same_health_names(local: Json, k8s: Json) -> None:
    assert _health_names(local) == _health_names(k8s) == {**HEALTH_SERVICE_NAMES, "scoring_http": "/v2/health/ready"}


def test_same_http_filters(local: Json, k8s: Json) -> None:
    def filters(config: Json) -> dict[str, list[str]]:
        return {
            name: [f["name"] for f in _hcm(listener)["http_filters"]] for name, listener in _listeners(config).items()
        }

    assert filters(local) == filters(k8s)


def test_identical_apart_from_the_topology(local: Json, k8s: Json) -> None:
    """Timeouts, retries, health checking, limits, access logs: all shared, byte for byte."""

    def normalized(config: Json) -> Json:
        config = copy.deepcopy(config)
        for listener in config["static_resources"]["listeners"]:
            listener["address"]["socket_address"]["address"] = "LISTEN_HOST"
            for http_filter in _hcm(listener)["http_filters"]:
                if http_filter["name"] == TRANSCODER:
                    http_filter["typed_config"]["proto_descriptor"] = "DESCRIPTOR_SET"
            for host in _hcm(listener).get("route_config", {}).get("virtual_hosts", []):
                for route in host["routes"]:
                    body = route.get("direct_response", {}).get("body", {})
                    if "filename" in body:  # the OpenAPI document, beside the descriptor set
                        body["filename"] = "GENERATED_FILE"
        for cluster in config["static_resources"]["clusters"]:
            cluster["type"] = "DISCOVERY"
            cluster.pop("dns_lookup_family", None)
            cluster["load_assignment"]["endpoints"] = "ENDPOINTS"
        return config

    assert normalized(local) == normalized(k8s)


# ------------------------------------------------------------------- Kubernetes specifics


def test_kubernetes_clusters_resolve_headless_services(k8s: Json) -> None:
    for name, cluster in _clusters(k8s).items():
        assert cluster["type"] == "STRICT_DNS"
        assert cluster["dns_lookup_family"] == "V4_ONLY"
        # The Service has the cluster's name; its port is the service's gRPC port, or for
        # `<service>_http` the same Service's HTTP port.
        service = name.removesuffix("_http")
        port = kubernetes.http_port(service) if name != service else kubernetes.service_port(name)
        assert _endpoints(cluster) == [(service, port)]


def test_kubernetes_envoy_traces_to_the_collector_service(k8s: Json) -> None:
    (collector,) = [c for c in k8s["static_resources"]["clusters"] if c["name"] == envoy.COLLECTOR_CLUSTER]
    assert collector["dns_lookup_family"] == "V4_PREFERRED"
    assert collector["type"] == "STRICT_DNS"
    assert _endpoints(collector) == [("otel-collector", 4317)]
    services = (envoy.REPO_ROOT / "deploy" / "base" / "otel-collector.yaml").read_text()
    assert "name: otel-collector" in services and "4317" in services
    kustomization = (envoy.REPO_ROOT / "deploy" / "base" / "kustomization.yaml").read_text()
    # Envoy starts most traces: it samples at the rate the services are configured with.
    assert f"OTEL_TRACES_SAMPLER_ARG={kubernetes.TRACING.sampling_percent / 100:g}" in kustomization
    for listener in _listeners(k8s).values():
        assert _hcm(listener)["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"


def test_kubernetes_listeners_bind_every_interface_admin_stays_local(k8s: Json) -> None:
    for listener in _listeners(k8s).values():
        assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
    assert k8s["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_kubernetes_descriptor_set_is_the_images_path(k8s: Json) -> None:
    (transcoder,) = [f for f in _hcm(_listeners(k8s)["edge"])["http_filters"] if f["name"] == TRANSCODER]
    assert transcoder["typed_config"]["proto_descriptor"] == str(kubernetes.DESCRIPTOR_SET)
    dockerfile = (envoy.REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert f" {kubernetes.DESCRIPTOR_SET}\n" in dockerfile  # COPY ... <that path>


def test_gateway_targets_are_envoys_backend_listeners(k8s: Json) -> None:
    ports = _ports(k8s)
    assert kubernetes.gateway_targets() == {
        f"GATEWAY_{b.upper()}_TARGET": f"{kubernetes.ENVOY}:{ports[b]}" for b in BACKENDS
    }


def test_tls_variant_only_adds_the_edge_tls_context(k8s: Json) -> None:
    tls = kubernetes.render_config("tls")
    edge = _listeners(tls)["edge"]
    (chain,) = edge["filter_chains"]
    socket = chain.pop("transport_socket")
    assert tls == k8s  # with the transport socket removed, nothing else differs
    context = socket["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]  # gRPC and REST on one port
    (certificate,) = context["tls_certificates"]
    assert certificate["certificate_chain"]["filename"] == str(kubernetes.TLS_DIR / "tls.crt")
    assert certificate["private_key"]["filename"] == str(kubernetes.TLS_DIR / "tls.key")


def test_mtls_variant_only_adds_transport_sockets(k8s: Json) -> None:
    """The mtls variant is the plain one plus TLS on every listener and service cluster
    (and the node identity SDS needs): nothing else differs."""
    mtls = copy.deepcopy(kubernetes.render_config("mtls"))
    assert mtls.pop("node") == {"id": "envoy", "cluster": "infermesh"}
    resources = mtls["static_resources"]
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            assert chain.pop("transport_socket")["name"] == "envoy.transport_sockets.tls"
    for cluster in resources["clusters"]:
        if cluster["name"] != envoy.COLLECTOR_CLUSTER:
            assert cluster.pop("transport_socket")["name"] == "envoy.transport_sockets.tls"
    assert mtls == k8s


def test_unknown_variant_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        kubernetes.render_config("spiffe")


# ------------------------------------------------------------------- committed files


def test_committed_configmap_sources_are_fresh() -> None:
    assert kubernetes.stale_configs() == [], "run `python -m infermesh.kubernetes render` and commit deploy/"


def test_committed_files_are_the_canonical_json_of_a_rendering() -> None:
    for variant, relative in kubernetes.CONFIG_FILES.items():
        text = (envoy.REPO_ROOT / relative).read_text(encoding="utf-8")
        assert text == envoy.to_json(kubernetes.render_config(variant))


def test_stale_and_missing_files_are_reported(tmp_path: Path) -> None:
    kubernetes.write_configs(tmp_path)
    assert kubernetes.stale_configs(tmp_path) == []
    plain, tls = (kubernetes.CONFIG_FILES[variant] for variant in ("plain", "tls"))
    (tmp_path / plain).write_text((tmp_path / plain).read_text().replace('"STRICT_DNS"', '"STATIC"'))
    (tmp_path / tls).unlink()
    (sds_file,) = [p for p in kubernetes.generated_files() if p.name == "sds-mesh-ca.json"]
    (tmp_path / sds_file).unlink()
    assert kubernetes.stale_configs(tmp_path) == [plain, tls, sds_file]
