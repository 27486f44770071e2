"""Settings from prefixed environment variables: defaults with an empty environment, every
bad value refused at start as a SettingsError naming its variable, frozen objects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gateway.service import GatewaySettings
from services.features.service import FeaturesSettings
from services.ranking.service import RankingSettings
from services.runtime.server import load_tls_settings
from services.runtime.settings import ServiceSettings, SettingsError, load_settings
from services.scoring.service import ScoringSettings

ROOT = Path(__file__).resolve().parents[2]


class Example(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_")

    port: int = Field(1, ge=1)
    ratio: float = 0.5
    name: str = "a"
    verbose: bool = False


def test_settings_read_prefixed_variables_and_keep_defaults() -> None:
    got = load_settings(Example, {"DEMO_PORT": "7", "DEMO_VERBOSE": "yes", "OTHER_NAME": "x", "NAME": "y"})
    assert got == Example(port=7, ratio=0.5, name="a", verbose=True)


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("DEMO_PORT", "eighty", "DEMO_PORT='eighty': Input should be a valid integer"),
        ("DEMO_PORT", "0", "DEMO_PORT='0': Input should be greater than or equal to 1"),
        ("DEMO_VERBOSE", "maybe", "DEMO_VERBOSE='maybe': Input should be a valid boolean"),
    ],
)
def test_bad_settings_name_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(Example, {var: value})
    assert message in str(info.value)


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(Example, {"DEMO_PORT": "x", "DEMO_RATIO": "y"})
    assert "DEMO_PORT='x'" in str(info.value) and "DEMO_RATIO='y'" in str(info.value)


def test_settings_are_frozen_and_code_built_ones_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "9")
    assert Example().port == 1  # built in code: only what it is given
    assert load_settings(Example).port == 9  # load_settings reads os.environ by default
    with pytest.raises(pydantic.ValidationError):
        Example().port = 2  # type: ignore[misc]
    with pytest.raises(SettingsError, match="DEMO_TYPO"):
        Example(typo=1)  # type: ignore[call-arg]


SERVICES = [FeaturesSettings, ScoringSettings, RankingSettings, GatewaySettings]


@pytest.mark.parametrize("settings_cls", SERVICES)
def test_defaults_load_with_an_empty_environment(settings_cls: type[ServiceSettings]) -> None:
    loaded = load_settings(settings_cls, {})
    assert loaded == settings_cls()
    assert loaded.port == settings_cls.model_fields["port"].default


def test_the_documented_defaults_hold() -> None:
    # Deploy manifests, docs and tests rely on these.
    assert (FeaturesSettings().port, ScoringSettings().port, RankingSettings().port, GatewaySettings().port) == (
        30200,
        30300,
        30400,
        30100,
    )
    assert GatewaySettings().trace_id_metadata == "rest" and RankingSettings().trace_id_metadata == "trailing"
    assert ScoringSettings().model_repository == ".infermesh/models" and ScoringSettings().providers == "auto"
    assert FeaturesSettings().cache_max_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("settings_cls", "env", "message"),
    [
        (FeaturesSettings, {"FEATURES_PORT": "70000"}, "FEATURES_PORT='70000': Input should be less than or equal"),
        (FeaturesSettings, {"FEATURES_MAX_ITEMS": "0"}, "FEATURES_MAX_ITEMS='0': Input should be greater than"),
        (FeaturesSettings, {"FEATURES_REDIS_TIMEOUT_SECONDS": "soon"}, "FEATURES_REDIS_TIMEOUT_SECONDS='soon'"),
        (FeaturesSettings, {"FEATURES_BREAKER_FAILURES": "0"}, "FEATURES_BREAKER_FAILURES='0'"),
        (FeaturesSettings, {"FEATURES_REDIS_URL": ""}, "FEATURES_REDIS_URL='': String should have at least 1"),
        (ScoringSettings, {"SCORING_PROVIDERS": "gpu"}, "SCORING_PROVIDERS='gpu': Input should be 'auto', 'tensorrt'"),
        (ScoringSettings, {"SCORING_MODEL_CONTROL_MODE": "watch"}, "SCORING_MODEL_CONTROL_MODE='watch'"),
        (ScoringSettings, {"SCORING_INTRA_OP_THREADS": "-1"}, "SCORING_INTRA_OP_THREADS='-1'"),
        (ScoringSettings, {"SCORING_MAX_MESSAGE_BYTES": "abc"}, "SCORING_MAX_MESSAGE_BYTES='abc': Input should be"),
        (ScoringSettings, {"SCORING_TRACE_ID_METADATA": "header"}, "SCORING_TRACE_ID_METADATA='header'"),
        (RankingSettings, {"RANKING_MAX_ITEMS": "-5"}, "RANKING_MAX_ITEMS='-5'"),
        (RankingSettings, {"RANKING_MMR_TOP_N": "0"}, "RANKING_MMR_TOP_N='0'"),
        (RankingSettings, {"RANKING_REDIS_FAILURES_TO_SKIP": "0"}, "RANKING_REDIS_FAILURES_TO_SKIP='0'"),
        (GatewaySettings, {"GATEWAY_DEFAULT_K": "0"}, "GATEWAY_DEFAULT_K='0'"),
        (
            GatewaySettings,
            {"GATEWAY_TIMEOUT_SECONDS": "0"},
            "GATEWAY_TIMEOUT_SECONDS='0': Input should be greater than 0",
        ),
        (GatewaySettings, {"GATEWAY_SEND_ITEM_EMBEDDINGS": "sometimes"}, "GATEWAY_SEND_ITEM_EMBEDDINGS='sometimes'"),
        (GatewaySettings, {"GATEWAY_SHADOW_MAX_IN_FLIGHT": "0"}, "GATEWAY_SHADOW_MAX_IN_FLIGHT='0'"),
        (GatewaySettings, {"GATEWAY_DEFAULT_K": "50", "GATEWAY_MAX_K": "10"}, "GATEWAY_DEFAULT_K=50 is above"),
    ],
)
def test_a_bad_value_fails_naming_the_variable(
    settings_cls: type[ServiceSettings], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(settings_cls, env)
    assert message in str(info.value)


def test_good_values_are_converted() -> None:
    features = load_settings(FeaturesSettings, {"FEATURES_CACHE_TTL_SECONDS": "0.1", "FEATURES_PORT": "1234"})
    assert (features.cache_ttl_seconds, features.port) == (0.1, 1234)
    gateway = load_settings(
        GatewaySettings, {"GATEWAY_SEND_ITEM_EMBEDDINGS": "false", "GATEWAY_TRACE_ID_METADATA": "none"}
    )
    assert (gateway.send_item_embeddings, gateway.trace_id_metadata) == (False, "none")
    ranking = load_settings(RankingSettings, {"RANKING_RULES_MIN_SCORE": "-inf", "RANKING_CALIBRATION": " Platt "})
    assert ranking.rules_min_score == float("-inf") and ranking.calibration == "platt"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_TLS_CERT": "c"}, "GATEWAY_TLS_CERT and GATEWAY_TLS_KEY go together"),
        ({"GATEWAY_TLS_CLIENT_CA": "ca"}, "GATEWAY_TLS_CLIENT_CA needs GATEWAY_TLS_CERT and GATEWAY_TLS_KEY"),
    ],
)
def test_tls_settings_name_the_service_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_tls_settings("gateway", env)
    assert message in str(info.value)
    # Another service's variables are not this one's.
    assert load_tls_settings("scoring", env).mode == "plaintext"


def test_a_service_started_with_a_bad_value_exits_naming_it() -> None:
    env = {**os.environ, "RANKING_MMR_LAMBDA": "2", "RANKING_PORT": "1", "OTEL_TRACES_EXPORTER": "none"}
    done = subprocess.run(
        [sys.executable, "-m", "services.ranking"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "ranking: RANKING_MMR_LAMBDA='2': Input should be less than or equal to 1" in done.stderr
    assert "Traceback" not in done.stderr
