"""Budget arithmetic: one deadline split into per-stage budgets plus a fallback reserve."""

from __future__ import annotations

import time

import pytest

from gateway.budget import StageBudgets
from gateway.service import GatewaySettings
from services.runtime.settings import SettingsError, load_settings


def test_stage_budgets_and_reserve_add_up_to_the_deadline() -> None:
    budgets = StageBudgets(retrieval=0.15, features=0.25, scoring=0.35, ranking=0.15, reserve=0.10)
    plan = budgets.plan(2.0, ("retrieval", "features", "scoring", "ranking"))
    assert plan.reserve == pytest.approx(0.2)
    # The stages share what the reserve leaves, by weight: 0.9 * 2 s * w / 0.9.
    assert plan.stages == pytest.approx({"retrieval": 0.3, "features": 0.5, "scoring": 0.7, "ranking": 0.3})
    assert sum(plan.stages.values()) + plan.reserve == pytest.approx(2.0)


def test_a_stage_that_does_not_run_gives_its_share_to_the_others() -> None:
    plan = StageBudgets().plan(1.0, ("features", "scoring", "ranking"))
    assert sum(plan.stages.values()) + plan.reserve == pytest.approx(1.0)
    assert plan.stages["scoring"] == pytest.approx(0.9 * 0.35 / 0.75)
    assert plan.stages["features"] / plan.stages["ranking"] == pytest.approx(0.25 / 0.15)


def test_a_stage_gets_the_smaller_of_its_budget_and_what_remains_after_the_reserve() -> None:
    plan = StageBudgets().plan(1.0, ("features", "scoring", "ranking"))
    # Fresh: the budget binds.
    assert plan.timeout("scoring") == pytest.approx(plan.stages["scoring"], abs=0.01)
    # Late: what remains (minus the reserve) binds.
    late = type(plan)(end=time.monotonic() + 0.25, reserve=plan.reserve, stages=plan.stages)
    assert late.timeout("scoring") == pytest.approx(0.25 - 0.1, abs=0.01)
    # Past the reserve: no call at all (<= 0), so the fallback still has its time.
    spent = type(plan)(end=time.monotonic() + 0.05, reserve=plan.reserve, stages=plan.stages)
    assert spent.timeout("ranking") <= 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_SCORING_BUDGET": "0"}, "GATEWAY_SCORING_BUDGET='0': Input should be greater than 0"),
        ({"GATEWAY_RANKING_BUDGET": "-1"}, "GATEWAY_RANKING_BUDGET='-1': Input should be greater than 0"),
        ({"GATEWAY_FALLBACK_RESERVE": "1.0"}, "GATEWAY_FALLBACK_RESERVE='1.0': Input should be less than 1"),
        (
            {"GATEWAY_FALLBACK_RESERVE": "-0.1"},
            "GATEWAY_FALLBACK_RESERVE='-0.1': Input should be greater than or equal",
        ),
    ],
)
def test_impossible_budgets_fail_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(GatewaySettings, env)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs", [{"scoring": 0}, {"features": -1}, {"reserve": 1.0}])
def test_budgets_built_in_code_are_checked_the_same_way(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        StageBudgets(**kwargs)


def test_budgets_come_from_gateway_settings() -> None:
    settings = load_settings(GatewaySettings, {"GATEWAY_SCORING_BUDGET": "0.5", "GATEWAY_FALLBACK_RESERVE": "0.2"})
    budgets = settings.budgets()
    assert (budgets.scoring, budgets.reserve, budgets.features) == (0.5, 0.2, 0.25)
    # The settings' defaults are StageBudgets' own.
    assert load_settings(GatewaySettings, {}).budgets() == StageBudgets()
