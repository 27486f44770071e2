"""The OTEL_* variables as services/runtime/settings.py reads them and telemetry.py maps
them: endpoint and protocol resolution (the OTLP exporter spec's rules), samplers,
resource precedence, and a start-up error naming the variable for every bad value.
What a collector then receives is checked in tests/integration/test_otel_variables.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

from infermesh.cli import _telemetry_env
from infermesh.up.supervisor import Mesh, MeshError
from services.runtime.settings import (
    SettingsError,
    TelemetrySettings,
    TracePipelineSettings,
    load_settings,
    parse_resource_attributes,
)
from services.runtime.telemetry import build_resource, build_sampler
from services.runtime.topology import local_topology


def settings(**env: str) -> TelemetrySettings:
    return load_settings(TelemetrySettings, env)


@pytest.mark.parametrize(
    ("env", "protocol", "endpoint"),
    [
        ({}, "grpc", ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "grpc", "http://c:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"}, "grpc", "c:4317"),  # a gRPC target
        # OTLP/HTTP: the generic endpoint is a base URL, v1/traces goes after its path ...
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
         "http/protobuf", "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c/otlp/"},
         "http/protobuf", "https://c/otlp/v1/traces"),
        # ... the per-signal one is used as it is.
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:1",
          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}, "http/protobuf", "http://c:4318/custom"),
        # The per-signal protocol wins over the generic one; empty means unset.
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "HTTP/Protobuf",
          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http/protobuf", "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "grpc", "http://c:4317"),
    ],
)  # fmt: skip
def test_protocol_and_endpoint_follow_the_spec(env: dict[str, str], protocol: str, endpoint: str) -> None:
    got = settings(**env)
    assert (got.traces_protocol, got.traces_endpoint, got.exporting) == (protocol, endpoint, bool(endpoint))


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
        {"OTEL_SDK_DISABLED": "false"},
    ],
)
def test_nothing_is_exported_when_disabled_or_without_an_endpoint(env: dict[str, str]) -> None:
    assert settings(**env).exporting is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL='http/json': OTLP/JSON is not supported; use grpc or http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http': Input should be"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED='yes': must be true or false"),
        ({"OTEL_TRACES_SAMPLER": "xray"}, "OTEL_TRACES_SAMPLER='xray': the xray sampler is not available here"),
        ({"OTEL_TRACES_SAMPLER": "ratio"}, "OTEL_TRACES_SAMPLER='ratio': Input should be 'always_on'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "-0.1"},
         "OTEL_TRACES_SAMPLER_ARG='-0.1': Input should be greater than or equal to 0"),
        ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG='half': Input should be a valid number"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin': Input should be 'otlp' or 'none'"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c"}, "OTEL_EXPORTER_OTLP_ENDPOINT='ftp://c': expected a URL"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:port"},
         "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT='http://c:port': bad port"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "c:4318"},
         "OTEL_EXPORTER_OTLP_ENDPOINT='c:4318/v1/traces': OTLP over http/protobuf needs a URL with its scheme"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=1,b"}, "OTEL_RESOURCE_ATTRIBUTES='a=1,b': expected key=value pairs"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "=1"}, "expected key=value pairs"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "a=50%"}, "the value of 'a' has a % that is not followed by two hex digits"),
    ],
)  # fmt: skip
def test_a_bad_value_is_a_start_up_error_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(**env)
    assert message in str(info.value)


def test_a_long_bad_value_is_not_echoed_whole() -> None:
    with pytest.raises(SettingsError) as info:
        settings(OTEL_RESOURCE_ATTRIBUTES="x" * 10_000)
    assert len(str(info.value)) < 400


def test_resource_attributes_are_percent_decoded() -> None:
    assert parse_resource_attributes(" a = b%2Cc ,, team=ml%20platform") == {"a": "b,c", "team": "ml platform"}


@pytest.mark.parametrize(
    ("env", "description"),
    [
        # Exporting: the spec's default, and each name as the spec maps it.
        ({}, ParentBased(ALWAYS_ON).get_description()),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, ALWAYS_ON.get_description()),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, ALWAYS_OFF.get_description()),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
         TraceIdRatioBased(0.25).get_description()),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, TraceIdRatioBased(1.0).get_description()),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, ParentBased(ALWAYS_OFF).get_description()),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
         ParentBased(TraceIdRatioBased(0.01)).get_description()),
    ],
)  # fmt: skip
def test_samplers(env: dict[str, str], description: str) -> None:
    got = build_sampler(settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4317", **env))
    assert got.get_description() == description


def test_without_export_new_traces_are_not_recorded_unless_a_sampler_is_set() -> None:
    assert build_sampler(settings()).get_description() == ParentBased(ALWAYS_OFF).get_description()
    assert build_sampler(settings(OTEL_TRACES_SAMPLER="always_on")) is ALWAYS_ON


def test_resource_precedence() -> None:
    plain = build_resource("ranking", settings()).attributes
    assert (plain["service.name"], plain["service.namespace"]) == ("ranking", "infermesh")
    given = build_resource(
        "ranking", settings(OTEL_RESOURCE_ATTRIBUTES="service.name=a,service.namespace=shop,k8s.pod.name=p-1")
    ).attributes
    assert (given["service.name"], given["service.namespace"], given["k8s.pod.name"]) == ("a", "shop", "p-1")
    named = build_resource(
        "ranking", settings(OTEL_RESOURCE_ATTRIBUTES="service.name=a", OTEL_SERVICE_NAME="b")
    ).attributes
    assert named["service.name"] == "b"


def test_the_trace_pipeline_is_fast_unless_stock_is_asked() -> None:
    # fast: the side-by-side benchmark at 100% sampling (docs/benchmarks.md) chose it.
    assert load_settings(TracePipelineSettings, {}).trace_pipeline == "fast"
    assert load_settings(TracePipelineSettings, {"INFERMESH_TRACE_PIPELINE": " Stock"}).trace_pipeline == "stock"
    with pytest.raises(SettingsError, match="INFERMESH_TRACE_PIPELINE='lean'"):
        load_settings(TracePipelineSettings, {"INFERMESH_TRACE_PIPELINE": "lean"})


SETUP = """
import json
from opentelemetry import trace
from services.runtime.telemetry import setup_telemetry, tracer
telemetry = setup_telemetry("probe")
processors = telemetry.provider._active_span_processor._span_processors if telemetry.provider else ()
exporters = [type(p.span_exporter if hasattr(p, "span_exporter") else p._batch_processor._exporter).__name__
             + "@" + type(p.span_exporter if hasattr(p, "span_exporter") else p._batch_processor._exporter).__module__
             for p in processors]
print(json.dumps({"provider": type(trace.get_tracer_provider()).__name__, "tracer": type(tracer()).__name__,
                  "exporters": exporters, "pipeline": telemetry.pipeline}))
telemetry.shutdown()
"""


def _setup(**env: str) -> dict:
    import json
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "INFERMESH_TRACE"))}
    done = subprocess.run(
        [sys.executable, "-c", SETUP], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2], env={**clean, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("env", "tracer", "exporter"),
    [
        ({}, "LeanTracer", "FastOTLPSpanExporter@services.runtime.otlp_encoding"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "LeanTracer",
         "FastOTLPHttpSpanExporter@services.runtime.otlp_encoding"),
        ({"INFERMESH_TRACE_PIPELINE": "stock"}, "Tracer",
         "OTLPSpanExporter@opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
        ({"INFERMESH_TRACE_PIPELINE": "stock", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "Tracer",
         "OTLPSpanExporter@opentelemetry.exporter.otlp.proto.http.trace_exporter"),
    ],
)  # fmt: skip
def test_the_fast_pipeline_is_the_default_and_stock_an_option(env: dict[str, str], tracer: str, exporter: str) -> None:
    got = _setup(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", **env)
    assert (got["provider"], got["tracer"], got["exporters"]) == ("TracerProvider", tracer, [exporter])


def test_sdk_disabled_installs_no_provider_and_starts_no_exporter() -> None:
    got = _setup(OTEL_SDK_DISABLED="true", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert got["provider"] == "ProxyTracerProvider" and got["exporters"] == []


# ---------------------------------------------------------------------------- infermesh up


def _mesh(tmp_path: Path, env: dict[str, str]) -> Mesh:
    return Mesh(
        topology=local_topology(descriptor_set=tmp_path / "api.binpb"),
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:1/0",
        model_repository=tmp_path,
        log_dir=tmp_path,
        extra_env=env,
    )


def test_up_checks_the_variables_before_starting_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    with pytest.raises(MeshError, match="OTEL_TRACES_SAMPLER='sometimes'"):
        _mesh(tmp_path, {"OTEL_TRACES_SAMPLER": "sometimes"}).tracing()
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert _mesh(tmp_path, {**endpoint, "OTEL_SDK_DISABLED": "true"}).tracing() is None  # Envoy: no tracer either
    tracing = _mesh(tmp_path, {**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}).tracing()
    assert tracing is not None
    assert (tracing.protocol, tracing.otlp_endpoint) == ("http/protobuf", "http://127.0.0.1:4318/v1/traces")


def test_up_flags_set_the_standard_variables() -> None:
    args = argparse.Namespace(trace_sampling=0.25, trace_view=False)
    env = _telemetry_env(args, "http://collector:4318")
    # The flag is the base URL; an OTEL_EXPORTER_OTLP_TRACES_ENDPOINT in the shell, used as it
    # is, must not win over it: emptied (empty is unset).
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == ""
    assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == ("parentbased_traceidratio", "0.25")
    shell = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://old:1/x"}
    assert settings(**{**shell, **env}).traces_endpoint == "http://collector:4318/v1/traces"
