"""The model repository's memory budget: the setting, the estimate and the choice of evictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.settings import SettingsError, load_settings
from services.scoring.models import memory_estimate
from services.scoring.repository import BUDGET_VARIABLE, Candidate, ModelRepository, RepositoryOptions, plan_evictions
from services.scoring.service import ScoringSettings


def test_the_setting_defaults_to_no_budget() -> None:
    assert load_settings(ScoringSettings, {}).model_memory_budget_bytes == 0
    settings = load_settings(ScoringSettings, {BUDGET_VARIABLE: "8589934592"})
    assert settings.model_memory_budget_bytes == 8 * 1024**3


@pytest.mark.parametrize("value", ["-1", "2GB", "1.5"])
def test_a_bad_setting_fails_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match=f"{BUDGET_VARIABLE}={value!r}: "):
        load_settings(ScoringSettings, {BUDGET_VARIABLE: value})


def test_the_repository_takes_the_budget_from_its_options(tmp_path: Path) -> None:
    assert ModelRepository(tmp_path).memory_budget == 0
    assert ModelRepository(tmp_path, RepositoryOptions(memory_budget_bytes=1000)).memory_budget == 1000
    with pytest.raises(ValueError, match="memory budget"):
        ModelRepository(tmp_path, RepositoryOptions(memory_budget_bytes=-1))


def test_memory_estimate_is_the_file_once_per_instance() -> None:
    assert memory_estimate(1000, 1) == 1000
    assert memory_estimate(1000, 3) == 3000


def _c(name: str, last_used: float, size: int = 100, evictable: bool = True) -> Candidate:
    return Candidate(name, last_used, size, evictable)


def test_nothing_is_evicted_when_the_version_fits() -> None:
    assert plan_evictions([_c("a", 1), _c("b", 2)], in_use=200, needed=100, budget=300) == []
    assert plan_evictions([], in_use=0, needed=300, budget=300) == []


def test_the_least_recently_used_go_first_and_no_more_than_needed() -> None:
    candidates = [_c("a", 3), _c("b", 1), _c("c", 2)]
    assert [c.name for c in plan_evictions(candidates, in_use=300, needed=100, budget=300) or []] == ["b"]
    assert [c.name for c in plan_evictions(candidates, in_use=300, needed=200, budget=300) or []] == ["b", "c"]


def test_busy_models_are_skipped() -> None:
    candidates = [_c("a", 1, evictable=False), _c("b", 2)]
    assert [c.name for c in plan_evictions(candidates, in_use=200, needed=100, budget=200) or []] == ["b"]


def test_none_when_evicting_everything_idle_would_not_make_room() -> None:
    # Then nothing is unloaded at all (no partial eviction for a load that fails anyway).
    candidates = [_c("a", 1, evictable=False), _c("b", 2)]
    assert plan_evictions(candidates, in_use=200, needed=150, budget=200) is None
    # Versions of the loading model that stay count too, and are never candidates.
    assert plan_evictions([_c("a", 1)], in_use=250, needed=100, budget=200) is None


def test_a_large_idle_model_can_make_room_for_several() -> None:
    candidates = [_c("small", 1, size=50), _c("large", 2, size=400)]
    assert [c.name for c in plan_evictions(candidates, in_use=450, needed=200, budget=500) or []] == ["small", "large"]
