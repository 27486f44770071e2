"""The settings of the `infermesh` command and its tools, on the services' mechanism.

Tools read environment variables the same way the services do (services/runtime/settings.py:
declared, typed, checked at start, errors naming the variable): their own under
`INFERMESH_*`, and where a tool works on a service's data (the model repository, the feature
registry and namespace) that service's own variable, so a tool and the service it serves
cannot disagree. Command-line flags override them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.runtime.redis_keys import DEFAULT_REDIS_URL
from services.runtime.settings import ServiceSettings, load_settings

# The Redis `infermesh up` starts (--redis-port): where the tools, like the services, look
# by default. One definition for all: services/runtime/redis_keys.py.
LOCAL_REDIS_URL = DEFAULT_REDIS_URL


class ToolSettings(ServiceSettings):
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
