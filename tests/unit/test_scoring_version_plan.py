"""Which versions on disk a model serves, and which of them to (re)load: discovery.plan_versions."""

from __future__ import annotations

from services.scoring.config import VersionPolicy
from services.scoring.discovery import plan_versions

LATEST = VersionPolicy()  # latest, 1 version
OLD, NEW = (1, 100, "cfg"), (2, 100, "cfg")  # fingerprints: the file was rewritten


def test_new_versions_on_disk_load() -> None:
    assert plan_versions(LATEST, {1: OLD, 2: OLD}, serving={}, failed={}) == ([2], [2])


def test_a_version_serving_from_its_current_file_is_left_alone() -> None:
    assert plan_versions(LATEST, {2: OLD}, serving={2: OLD}, failed={}) == ([2], [])


def test_a_rewritten_file_reloads() -> None:
    assert plan_versions(LATEST, {2: NEW}, serving={2: OLD}, failed={}) == ([2], [2])


def test_a_broken_newest_version_falls_back_to_the_one_before() -> None:
    assert plan_versions(LATEST, {1: OLD, 2: OLD}, serving={}, failed={2: OLD}) == ([1], [1])


def test_a_broken_file_is_retried_once_it_changes() -> None:
    assert plan_versions(LATEST, {1: OLD, 2: NEW}, serving={}, failed={2: OLD}) == ([2], [2])


def test_a_version_whose_new_file_failed_keeps_serving_the_old_one() -> None:
    assert plan_versions(LATEST, {1: OLD, 2: NEW}, serving={2: OLD}, failed={2: NEW}) == ([2], [])


def test_the_policy_decides_how_many_serve() -> None:
    two = VersionPolicy(num_versions=2)
    assert plan_versions(two, {1: OLD, 2: OLD, 3: OLD}, serving={3: OLD}, failed={}) == ([2, 3], [2])
