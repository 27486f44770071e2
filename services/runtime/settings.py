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
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

T = TypeVar("T", bound="ServiceSettings")

# How each response returns its trace id (x-trace-id); see RequestInterceptor in server.py.
TraceIdMetadata = Literal["none", "trailing", "initial"]


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
            problems.append(f"{variable}={problem['input']!r}: {message}")
        else:  # a model validator: its message names the variables itself
            problems.append(message)
    return "; ".join(problems)


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


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        if self.case_sensitive:
            return dict(self._environ)
        return {name.lower(): value for name, value in self._environ.items()}


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
        description="How long in-flight calls (and the service's own shutdown) get to finish once new calls are refused.",
    )
    readiness_interval_seconds: float = Field(
        1.0, gt=0, description="How often readiness is re-checked and published on the gRPC health service."
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest gRPC message received or sent, in bytes."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 turns it off.")
    trace_id_metadata: TraceIdMetadata = Field(
        "trailing",
        description=(
            "How each response returns its trace id (x-trace-id): trailing metadata (free), "
            "initial metadata (also an HTTP header for REST clients behind Envoy; one more "
            "write per call) or none."
        ),
    )
