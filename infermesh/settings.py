"""The settings of the `infermesh` command and its tools, on the services' mechanism.

Tools read environment variables the same way the services do (services/runtime/settings.py:
declared, typed, checked at start, errors naming the variable): their own under
`INFERMESH_*`, and where a tool works on a service's data (the model repository, the feature
registry and namespace) that service's own variable, so a tool and the service it serves
cannot disagree. Command-line flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from infermesh.loopback import is_loopback_host
from services.runtime.redis_connection import RedisClientSettings, RedisTarget
from services.runtime.redis_keys import DEFAULT_REDIS_URL
from services.runtime.settings import load_settings

# The Redis `infermesh up` starts (--redis-port): where the tools, like the services, look
# by default. One definition for all: services/runtime/redis_keys.py.
LOCAL_REDIS_URL = DEFAULT_REDIS_URL


class ToolSettings(RedisClientSettings):
    """The `infermesh` command and its tools: up, seed, status, profile, bench, chaos, certs,
    features, models."""

    model_config = SettingsConfigDict(env_prefix="INFERMESH_")

    data_dir: str = Field(
        ".infermesh",
        min_length=1,
        description=(
            "Models, Redis dump, candidate index, rendered Envoy config, logs and the run file of a local mesh."
        ),
    )
    redis_url: str = Field(
        "",
        # REDIS_URL, the name most Redis tooling reads, is accepted as well.
        validation_alias=AliasChoices("INFERMESH_REDIS_URL", "REDIS_URL"),
        description=(
            "Redis the tools use (`redis://host:port/db`); for `up`, use it instead of starting a "
            "redis-server. Also read from REDIS_URL. Empty: `up` starts its own; other tools use "
            f"the one `up` starts ({LOCAL_REDIS_URL})."
        ),
    )


def tool_settings() -> ToolSettings:
    """Read at each call (parsers are built once per command): tests and embedders may change
    the environment between calls."""
    return load_settings(ToolSettings)


def tools_redis_url() -> str:
    return tool_settings().redis_url or LOCAL_REDIS_URL


# ---- Redis credentials of the tools and of the Redis `infermesh up` starts


def redis_password_file(data_dir: Path, port: int) -> Path:
    """Where `infermesh up` keeps the password it generated for its redis-server on `port`
    (mode 0600). Per port: a tool pointed at another Redis on this machine is not given it."""
    return data_dir / f"redis-{port}.password"


def local_redis_password(data_dir: Path, port: int) -> str:
    """The password of the Redis `up` starts on `port` for `data_dir`: the one kept there,
    else a new one written there first (owner-only from its creation)."""
    path = redis_password_file(data_dir, port)
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if password:
        path.chmod(0o600)
        return password
    password = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(password + "\n")
    path.chmod(0o600)  # an older file's mode, whatever the umask left
    return password


def tools_redis_target(url: str, data_dir: Path | None = None) -> RedisTarget:
    """`url` with INFERMESH_REDIS_USERNAME, _PASSWORD and _TLS_*. Without a password from
    either, a Redis on this machine gets the one `up` keeps in `data_dir` for its port (if
    any): tools then work against the mesh's Redis without being told. Raises SettingsError."""
    settings = tool_settings()
    target = settings.redis_target(url)
    if target.password.get_secret_value() or urlsplit(url).password is not None or not _on_this_machine(url):
        return target
    port = urlsplit(url).port or 6379
    path = redis_password_file(data_dir if data_dir is not None else Path(settings.data_dir), port)
    try:
        password = path.read_text().strip()
    except OSError:
        return target
    return dataclasses.replace(target, password=SecretStr(password), password_variable=str(path))


def _on_this_machine(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def redis_env(prefix: str, target: RedisTarget) -> dict[str, str]:
    """The {PREFIX}_REDIS_* variables (URL, credentials, TLS files) a service gets for `target`."""
    values = {
        name: value.get_secret_value() if isinstance(value, SecretStr) else value
        for name, value in target.settings_values().items()
    }
    return {f"{prefix}_{name.upper()}": value for name, value in values.items() if value}


def model_repository() -> str:
    """Where the scoring service finds its models: SCORING_MODEL_REPOSITORY or its default."""
    from services.scoring.service import ScoringSettings  # the service's own declaration

    return load_settings(ScoringSettings).model_repository


def features_settings() -> tuple[str, str]:
    """(registry file, Redis namespace) of the features service: FEATURES_REGISTRY, FEATURES_NAMESPACE."""
    from services.features.service import FeaturesSettings

    settings = load_settings(FeaturesSettings)
    return settings.registry, settings.namespace


def add_data_dir_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--data-dir, the same for every tool: INFERMESH_DATA_DIR or ./.infermesh by default."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tool_settings().data_dir),
        help=f"{what} (default $INFERMESH_DATA_DIR or ./.infermesh)",
    )
