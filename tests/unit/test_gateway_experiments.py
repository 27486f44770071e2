"""Experiments: the A/B split by a stable hash of the user id, the file format, and reloads
that keep the previous configuration when the new file is broken."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest

from gateway.experiments import (
    BUCKETS,
    Experiments,
    ExperimentsError,
    Shadow,
    bucket,
    load,
    parse,
)

USERS = [f"u{n}" for n in range(10_000)]


def ab(control: float, treatment: float, name: str = "ranker-v2") -> dict:
    return {
        "name": name,
        "arms": [
            {"name": "control", "model": "ranker", "version": 1, "percent": control},
            {"name": "treatment", "model": "ranker", "version": "2", "percent": treatment},
        ],
    }


@pytest.mark.parametrize(("control", "treatment"), [(50, 50), (90, 10), (99, 1), (70.5, 29.5)])
def test_split_over_10000_users_is_within_one_point_of_the_ratio(control: float, treatment: float) -> None:
    config = parse(ab(control, treatment), "ranker")
    counts = Counter(config.assign(user, "ranker").arm for user in USERS)
    assert abs(100 * counts["treatment"] / len(USERS) - treatment) < 1.0, counts
    assert abs(100 * counts["control"] / len(USERS) - control) < 1.0, counts


def test_assignment_is_stable_per_user_and_salted_by_the_experiment_name() -> None:
    first = parse(ab(50, 50), "ranker")
    again = parse(ab(50, 50), "ranker")  # another gateway replica, or after a restart
    arms = [first.assign(u, "ranker").arm for u in USERS]
    assert arms == [again.assign(u, "ranker").arm for u in USERS]
    assert arms == [first.assign(u, "ranker").arm for u in USERS]
    # A new experiment name reshuffles users: about half land elsewhere, not all or none.
    renamed = parse(ab(50, 50, name="ranker-v3"), "ranker")
    moved = sum(a != renamed.assign(u, "ranker").arm for u, a in zip(USERS, arms, strict=True))
    assert 0.4 < moved / len(USERS) < 0.6
    assert all(0 <= bucket("x", u) < BUCKETS for u in USERS[:100])


def test_an_arm_carries_its_model_and_version() -> None:
    config = parse(ab(0, 100), "ranker")
    assignment = config.assign("u1", "ranker")
    assert (assignment.experiment, assignment.arm, assignment.model, assignment.version) == (
        "ranker-v2",
        "treatment",
        "ranker",
        "2",
    )


def test_growing_a_canary_keeps_its_users() -> None:
    small = parse(ab(95, 5), "ranker")
    large = parse(ab(80, 20), "ranker")
    before = {u for u in USERS if small.assign(u, "ranker").arm == "treatment"}
    after = {u for u in USERS if large.assign(u, "ranker").arm == "treatment"}
    assert before < after


def test_overrides_pin_users() -> None:
    config = parse({**ab(100, 0), "overrides": {"u7": "treatment", 12: "treatment"}}, "ranker")
    assert config.assign("u7", "ranker").arm == "treatment"
    assert config.assign("12", "ranker").arm == "treatment"
    assert config.assign("u8", "ranker").arm == "control"


def test_no_arms_means_the_default_model_and_shadow_can_stand_alone() -> None:
    config = parse({"shadow": {"version": 2, "percent": 25, "max_in_flight": 3}}, "ranker")
    assignment = config.assign("u1", "ranker")
    assert (assignment.arm, assignment.model, assignment.version) == ("", "ranker", "")
    assert config.shadow == Shadow(model="ranker", version="2", percent=25.0, max_in_flight=3, timeout_seconds=1.0)
    assert parse(None, "ranker").assign("u1", "ranker").arm == ""


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**ab(50, 40)}, "sum to 100, they sum to 90"),
        ({**ab(50, 50), "colour": "blue"}, "unknown keys"),
        ({"arms": ab(50, 50)["arms"]}, "name"),
        ({**ab(50, 50), "overrides": {"u1": "nope"}}, "unknown arm 'nope'"),
        ({**ab(50, 50), "overrides": {"u1": ["control"]}}, "unknown arm"),
        ({"name": "x", "arms": [{"name": "a", "percent": 50}, {"name": "a", "percent": 50}]}, "unique"),
        ({"name": "x", "arms": [{"name": "a", "percent": 100, "version": "latest"}]}, "version number"),
        ({"name": "x", "arms": [{"name": "a", "percent": 100.005}]}, "within 0..100"),
        ({"name": "x", "arms": [{"name": "a", "percent": 33.333}, {"name": "b", "percent": 66.667}]}, "0.01"),
        ({"name": "x", "arms": [{"name": "a"}]}, "needs a percent"),
        ({"shadow": {"version": 2, "max_in_flight": 0}}, "max_in_flight"),
        ({"shadow": {"version": 2, "timeout_seconds": -1}}, "timeout_seconds"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_invalid_files_are_rejected_with_the_key_named(doc: object, message: str) -> None:
    with pytest.raises(ExperimentsError, match=message):
        parse(doc, "ranker")


def write(path: Path, text: str) -> None:
    """Replace the file and move its mtime on, so a change is seen even within one tick."""
    previous = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    stat = path.stat()
    if stat.st_mtime_ns <= previous:
        os.utime(path, ns=(stat.st_atime_ns, previous + 1_000_000))


def test_yaml_and_json_files_load(tmp_path: Path) -> None:
    yaml_file = tmp_path / "experiments.yaml"
    yaml_file.write_text(
        "name: ranker-v2\narms:\n  - {name: control, version: 1, percent: 90}\n"
        "  - {name: canary, version: 2, percent: 10}\nshadow: {version: 2, percent: 5}\n"
    )
    json_file = tmp_path / "experiments.json"
    json_file.write_text('{"name": "ranker-v2", "arms": [{"name": "control", "percent": 100}]}')
    assert [a.name for a in load(yaml_file, "ranker").arms] == ["control", "canary"]
    assert load(json_file, "ranker").arms[0].model == "ranker"
    json_file.write_text('{"name": ')
    with pytest.raises(ExperimentsError, match="does not parse"):
        load(json_file, "ranker")


def test_reload_keeps_the_previous_config_when_the_new_file_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    write(path, "name: e1\narms: [{name: control, version: 1, percent: 100}]\n")
    results: list[str] = []
    experiments = Experiments(path, "ranker", on_reload=results.append)
    assert experiments.assign("u1").arm == "control"
    assert not experiments.check()  # unchanged: nothing to do

    for broken in (
        "name: e1\narms: [{name: control, version: 1, percent: 100}",  # YAML syntax
        "name: e1\narms: [{name: control, version: 1, percent: 60}]\n",  # valid YAML, invalid config
    ):
        write(path, broken)
        assert not experiments.check()
        assert experiments.assign("u1").arm == "control" and experiments.assign("u1").version == "1"
    path.unlink()  # gone: also broken, the previous config keeps serving
    assert not experiments.check()
    assert experiments.assign("u1").arm == "control"
    assert results == ["error", "error", "error"]
    # The same broken file is reported once, not on every check.
    assert not experiments.check() and results == ["error", "error", "error"]

    write(path, "name: e1\narms: [{name: canary, version: 2, percent: 100}]\n")
    assert experiments.check()
    assert (experiments.assign("u1").arm, experiments.assign("u1").version) == ("canary", "2")
    assert results[-1] == "ok"


def test_an_empty_file_is_a_write_in_progress_not_a_config(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    write(path, "name: e1\narms: [{name: control, version: 1, percent: 100}]\n")
    results: list[str] = []
    experiments = Experiments(path, "ranker", on_reload=results.append)
    # What Path.write_text shows a reader between its truncation and its write.
    path.write_text("")
    assert not experiments.check() and not experiments.check(force=True)
    assert experiments.assign("u1").arm == "control" and results == []
    # The write lands (a broken file here): it is read, though an empty file came first.
    path.write_text("name: e1\narms: [{name: control, percent: 60}]\n")
    assert not experiments.check() and results == ["error"]
    assert experiments.assign("u1").arm == "control"
    write(path, "{}\n")
    assert experiments.check() and experiments.assign("u1").arm == ""


def test_a_broken_file_at_start_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text("arms: 3\n")
    with pytest.raises(ExperimentsError, match="arms must be a list"):
        Experiments(path, "ranker")
    with pytest.raises(ExperimentsError, match="cannot read"):
        Experiments(tmp_path / "missing.yaml", "ranker")


async def test_the_watcher_picks_up_a_change_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    write(path, "{}\n")
    experiments = Experiments(path, "ranker")
    assert experiments.assign("u1").arm == ""
    watcher = asyncio.create_task(experiments.watch(0.02))
    try:
        write(path, "name: e1\narms: [{name: b, version: 2, percent: 100}]\n")
        for _ in range(200):
            if experiments.assign("u1").arm == "b":
                break
            await asyncio.sleep(0.01)
        assert experiments.assign("u1").arm == "b"
    finally:
        watcher.cancel()
