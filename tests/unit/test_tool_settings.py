"""The tools' settings (infermesh/settings.py) on the services' mechanism."""

from __future__ import annotations

import pytest

from infermesh import settings as tool_settings_module
from infermesh.settings import LOCAL_REDIS_URL, ToolSettings, model_repository
from services.runtime.settings import SettingsError, load_settings


def test_defaults_and_both_redis_variables() -> None:
    assert load_settings(ToolSettings, {}).data_dir == ".infermesh"
    assert load_settings(ToolSettings, {}).redis_url == ""
    assert load_settings(ToolSettings, {"REDIS_URL": "redis://a:1/0"}).redis_url == "redis://a:1/0"
    both = {"REDIS_URL": "redis://a:1/0", "INFERMESH_REDIS_URL": "redis://b:2/0"}
    assert load_settings(ToolSettings, both).redis_url == "redis://b:2/0"  # the prefixed one wins
    assert load_settings(ToolSettings, {"INFERMESH_DATA_DIR": "/srv/mesh"}).data_dir == "/srv/mesh"


def test_a_bad_value_names_its_variable() -> None:
    with pytest.raises(SettingsError, match="INFERMESH_DATA_DIR=''"):
        load_settings(ToolSettings, {"INFERMESH_DATA_DIR": ""})


def test_tools_follow_the_services_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORING_MODEL_REPOSITORY", "/models/here")
    assert model_repository() == "/models/here"
    monkeypatch.delenv("INFERMESH_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert tool_settings_module.tools_redis_url() == LOCAL_REDIS_URL  # the Redis `up` starts
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:7/0")
    assert tool_settings_module.tools_redis_url() == "redis://elsewhere:7/0"
