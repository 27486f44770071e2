"""Settings from environment variables with a per-service prefix, on pydantic-settings.

Each service declares a frozen `ServiceSettings` subclass whose `env_prefix` names its
variables: field `port` of FeaturesSettings is read from FEATURES_PORT, and so on. Types,
ranges and choices are declared on the fields (Field(ge=...), Literal); checks across
fields are model validators. `python -m infermesh.settings_doc` writes docs/settings.md
from these declarations.

Only load_settings() reads the environment; a settings object built in code takes what it
is given plus the defaults, so tests and embedders do not pick up the shell's variables.
Either way a malformed value fails at once with a SettingsError naming the variable,
never later on the request path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

T = TypeVar("T", bound="ServiceSettings")

# How each response returns its trace id (x-trace-id); see RequestInterceptor in server.py.
TraceIdMetadata = Literal["none", "trailing", "initial", "rest"]


class SettingsError(ValueError):
    pass


def _describe(settings_cls: type[ServiceSettings], error: ValidationError) -> str:
    """Every problem of `error`, each naming its variable: "SCORING_PORT='x': ..."."""
    problems = []
    for problem in error.errors(include_url=False):
        cause = problem.get("ctx", {}).get("error")
        # A validator's own ValueError reads better than pydantic's "Value error, ..." wrap.
        message = str(cause) if problem["type"] == "value_error" and cause is not None else problem["msg"]
        if problem["loc"]:
            variable = settings_cls.variable(str(problem["loc"][0]))
            problems.append(f"{variable}={_bounded_input(problem['input'])}: {message}")
        else:  # a model validator: its message names the variables itself
            problems.append(message)
    return "; ".join(problems)


def _bounded_input(value: Any) -> str:
    """The offending value for the message, cut short: a variable can be long."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


class ServiceSettings(BaseSettings):
    """Base of every settings class: frozen, strict about unknown fields, errors naming variables."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        # Field names such as model_repository are settings, not pydantic's namespace.
        protected_namespaces=(),
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(_describe(type(self), error)) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Constructed in code: only what is given. load_settings() passes the environment in.
        return (init_settings,)

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of `field`: FEATURES_ + PORT."""
        return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"

    def check_paired(self, first: str, second: str) -> None:
        """ValueError naming both variables unless fields `first` and `second` are both set
        or both empty (a certificate and its key)."""
        if bool(getattr(self, first)) != bool(getattr(self, second)):
            raise ValueError(f"set both {self.variable(first)} and {self.variable(second)}, or neither")


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # As pydantic-settings' own source: an empty value is unset where the class says so.
        environ = {name: value for name, value in self._environ.items() if value or not self.env_ignore_empty}
        if self.case_sensitive:
            return environ
        return {name.lower(): value for name, value in environ.items()}


def load_settings(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from its `{PREFIX}{FIELD}` variables (os.environ by default), keeping defaults."""
    values = _MappingEnvSource(cls, os.environ if environ is None else environ)()
    return cls(**values)


def listen_port(default: int) -> Any:
    """The `port` field, whose default each service sets."""
    return Field(default, ge=1, le=65535, description="Port the gRPC server listens on.")


class ServerSettings(ServiceSettings):
    """What every service's server shares; read with the service's prefix (e.g. SCORING_PORT)."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds (0.0.0.0: every interface).")
    port: int = listen_port(50051)
    drain_seconds: float = Field(
        0.0,
        ge=0,
        description=(
            "On SIGTERM, how long health reports NOT_SERVING before the server stops accepting "
            "calls, so load balancers stop routing to it first; in a cluster, set it above the "
            "health-check interval."
        ),
    )
    grace_seconds: float = Field(
        10.0,
        ge=0,
        description=(
            "How long in-flight calls (and the service's own shutdown) get to finish once new calls are refused."
        ),
    )
    readiness_interval_seconds: float = Field(
        1.0, gt=0, description="How often readiness is re-checked and published on the gRPC health service."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest gRPC message received or sent, in bytes."
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 turns it off."
    )
    trace_id_metadata: TraceIdMetadata = Field(
        "trailing",
        description=(
            "How each response returns its trace id (x-trace-id): trailing metadata (free), "
            "initial metadata (also an HTTP header for REST clients behind Envoy; one more "
            "write per call), rest (initial metadata for REST calls transcoded by Envoy, "
            "trailing for gRPC calls) or none."
        ),
    )


# --------------------------------------------------------------------------- telemetry
# The standard OpenTelemetry variables every process reads (services, jobs workers, the
# jobs CLI), declared here like the services' own: checked at start, errors naming the
# variable. services/runtime/telemetry.py builds the tracer provider from them.

OtlpProtocol = Literal["grpc", "http/protobuf"]
TracesSampler = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]
# Where OTLP/HTTP puts traces under OTEL_EXPORTER_OTLP_ENDPOINT (the per-signal variable is
# a full URL, used as it is).
OTLP_HTTP_TRACES_PATH = "v1/traces"


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def parse_resource_attributes(text: str) -> dict[str, str]:
    """`key1=value1,key2=value2` (values percent-decoded, as the resource SDK spec says) ->
    a dict; a pair without `=` or with an empty key is an error, not silently dropped."""
    attributes: dict[str, str] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        key, equals, value = pair.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"expected key=value pairs separated by commas, got {_bounded(pair.strip())!r}")
        value = value.strip()
        if _BAD_PERCENT.search(value):
            raise ValueError(f"the value of {_bounded(key)!r} has a % that is not followed by two hex digits")
        try:
            attributes[key] = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(f"the value of {_bounded(key)!r} is not percent-encoded UTF-8") from None
    return attributes


def _bounded(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most] + "..."


def _lower(value: Any) -> Any:
    # OpenTelemetry's enum values are case-insensitive.
    return value.strip().lower() if isinstance(value, str) else value


class TelemetrySettings(ServiceSettings):
    """The standard OpenTelemetry variables, read by every service, jobs worker and the jobs
    CLI. A value the spec says to warn about and ignore (an unknown sampler, a ratio out of
    range, a boolean other than true/false) stops the process at start instead, so a typo
    cannot silently change what is exported. Empty means unset. Spans are exported only when
    an endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT);
    the other OTEL_EXPORTER_OTLP_* variables (headers, TLS files, timeout, compression) and
    OTEL_BSP_* are read by the OpenTelemetry exporter and batch processor themselves."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", env_ignore_empty=True)

    sdk_disabled: bool = Field(
        False,
        description=(
            "true: no tracer provider, no exporter, no spans (OpenTelemetry's no-op API; a "
            "caller's traceparent still passes through). Only true or false (any case)."
        ),
    )
    service_name: str = Field(
        "",
        description=(
            "service.name of the spans; wins over a service.name in OTEL_RESOURCE_ATTRIBUTES. "
            "Empty: that one, else the process's own name (gateway, scoring, ..., jobs-worker)."
        ),
    )
    resource_attributes: str = Field(
        "",
        description=(
            "Resource attributes of every span, `key=value,key=value` (values percent-encoded); "
            "they win over the defaults service.namespace=infermesh and service.instance.id=host:pid."
        ),
    )
    traces_exporter: Literal["otlp", "none"] = Field("otlp", description="none: record nothing, export nothing.")
    exporter_otlp_protocol: OtlpProtocol = Field(
        "grpc",
        description=(
            "OTLP transport of every signal: grpc or http/protobuf (http/json is not supported). "
            "grpc is the default of OpenTelemetry's Python distribution and of deploy/'s collector (4317)."
        ),
    )
    exporter_otlp_traces_protocol: OtlpProtocol | None = Field(
        None, description="OTLP transport of traces; empty: OTEL_EXPORTER_OTLP_PROTOCOL."
    )
    exporter_otlp_endpoint: str = Field(
        "",
        description=(
            "Collector base URL, e.g. http://collector:4317 (grpc) or http://collector:4318 "
            "(http/protobuf: `/v1/traces` is appended). Empty, with no traces endpoint either: no export."
        ),
    )
    exporter_otlp_traces_endpoint: str = Field(
        "",
        description=(
            "Collector URL for traces only, used as it is (http/protobuf: the whole URL, "
            "e.g. http://collector:4318/v1/traces); wins over OTEL_EXPORTER_OTLP_ENDPOINT."
        ),
    )
    traces_sampler: TracesSampler = Field(
        "parentbased_always_on",
        description=(
            "Which requests are traced. Behind Envoy use a parentbased_* sampler: Envoy starts "
            "each trace and the services follow its decision (`infermesh up` gives Envoy the "
            "same ratio). `infermesh up --trace-sampling R` sets parentbased_traceidratio and R."
        ),
    )
    traces_sampler_arg: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "The ratio of traceidratio / parentbased_traceidratio, 0..1 (empty: 1.0); ignored by the other samplers."
        ),
    )

    @field_validator("sdk_disabled", mode="before")
    @classmethod
    def _spec_boolean(cls, value: Any) -> Any:
        # The spec's booleans are the words true and false only; pydantic would also take
        # 1/yes/on, and the spec would read those as false.
        if isinstance(value, str):
            if value.strip().lower() not in ("true", "false"):
                raise ValueError("must be true or false")
            return value.strip().lower() == "true"
        return value

    @field_validator(
        "traces_exporter", "exporter_otlp_protocol", "exporter_otlp_traces_protocol", "traces_sampler", mode="before"
    )
    @classmethod
    def _enum(cls, value: Any) -> Any:
        value = _lower(value)
        if value == "http/json":
            raise ValueError("OTLP/JSON is not supported; use grpc or http/protobuf")
        if value in ("jaeger_remote", "parentbased_jaeger_remote", "xray"):
            raise ValueError(
                f"the {value} sampler is not available here; use always_on, always_off, "
                "traceidratio or a parentbased_* one"
            )
        return value

    @field_validator("resource_attributes")
    @classmethod
    def _resource_attributes(cls, value: str) -> str:
        parse_resource_attributes(value)
        return value

    @field_validator("exporter_otlp_endpoint", "exporter_otlp_traces_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        value = value.strip()
        if value:
            parts = urlsplit(value if "://" in value else f"http://{value}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("expected a URL such as http://collector:4317 (http or https)")
            try:
                parts.port  # noqa: B018 (raises on a bad port)
            except ValueError:
                raise ValueError("bad port") from None
        return value

    @model_validator(mode="after")
    def _http_needs_a_url(self) -> TelemetrySettings:
        if self.traces_protocol == "http/protobuf" and self.traces_endpoint and "://" not in self.traces_endpoint:
            raise ValueError(
                f"{self.traces_endpoint_variable}={_bounded(self.traces_endpoint)!r}: OTLP over http/protobuf "
                "needs a URL with its scheme, e.g. http://collector:4318"
            )
        return self

    # ---- what the variables resolve to
    @property
    def traces_protocol(self) -> OtlpProtocol:
        return self.exporter_otlp_traces_protocol or self.exporter_otlp_protocol

    @property
    def traces_endpoint_variable(self) -> str:
        if self.exporter_otlp_traces_endpoint:
            return self.variable("exporter_otlp_traces_endpoint")
        return self.variable("exporter_otlp_endpoint")

    @property
    def traces_endpoint(self) -> str:
        """Where spans go: the traces variable as it is, else the generic one, to which
        OTLP/HTTP adds `v1/traces` (after the base URL's own path, as the spec says)."""
        if self.exporter_otlp_traces_endpoint:
            return self.exporter_otlp_traces_endpoint
        base = self.exporter_otlp_endpoint
        if base and self.traces_protocol == "http/protobuf":
            return f"{base.removesuffix('/')}/{OTLP_HTTP_TRACES_PATH}"
        return base

    @property
    def exporting(self) -> bool:
        return not self.sdk_disabled and self.traces_exporter != "none" and bool(self.traces_endpoint)

    @property
    def sampler_ratio(self) -> float:
        return 1.0 if self.traces_sampler_arg is None else self.traces_sampler_arg

    def resource(self) -> dict[str, str]:
        return parse_resource_attributes(self.resource_attributes)


# Which span recording and OTLP encoding the processes use (docs/observability.md).
TracePipeline = Literal["stock", "fast"]


class TracePipelineSettings(ServiceSettings):
    """infermesh's own tracing choice, beside the OpenTelemetry variables."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_", env_ignore_empty=True)

    trace_pipeline: TracePipeline = Field(
        "fast",
        description=(
            "fast: spans recorded through services/runtime/lean_tracing.py and encoded by "
            "services/runtime/otlp_encoding.py, inside the standard OTLP exporters (the same spans "
            "and wire bytes, less CPU: at 100% sampling +18% throughput at c=32, docs/benchmarks.md, "
            '"Tracing: stock or fast span pipeline"). stock: the OpenTelemetry SDK and exporter as they ship.'
        ),
    )

    @field_validator("trace_pipeline", mode="before")
    @classmethod
    def _enum(cls, value: Any) -> Any:
        return _lower(value)
