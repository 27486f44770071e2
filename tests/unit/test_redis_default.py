"""One Redis for everything by default: the one `infermesh up` starts. Every service and every
command that reads Redis, with no variable or flag saying otherwise, agrees on its URL."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from infermesh import cli
from infermesh.bench import cli as bench_cli
from infermesh.features import cli as features_cli
from infermesh.settings import tools_redis_url
from infermesh.workload import seed
from services.features.service import FeaturesSettings
from services.jobs.settings import JobsSettings
from services.ranking.service import RankingSettings
from services.runtime.redis_keys import DEFAULT_REDIS_URL, LOCAL_REDIS_PORT
from services.runtime.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
REDIS_VARIABLES = ("INFERMESH_REDIS_URL", "REDIS_URL", "JOBS_REDIS_URL", "FEATURES_REDIS_URL", "RANKING_REDIS_URL")


@pytest.fixture
def no_redis_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in REDIS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_the_default_url_is_the_port_up_starts_redis_on() -> None:
    url = urlsplit(DEFAULT_REDIS_URL)
    assert (url.hostname, url.port) == ("127.0.0.1", LOCAL_REDIS_PORT)


def test_every_service_defaults_to_it() -> None:
    for settings_cls in (FeaturesSettings, RankingSettings, JobsSettings):
        assert load_settings(settings_cls, {}).redis_url == DEFAULT_REDIS_URL, settings_cls.__name__


@pytest.mark.usefixtures("no_redis_variables")
def test_every_command_defaults_to_it() -> None:
    assert tools_redis_url() == DEFAULT_REDIS_URL
    up = cli.build_parser().parse_args(["up"])
    assert up.redis_url is None and up.redis_port == LOCAL_REDIS_PORT  # starts its own, there
    assert seed.build_parser().parse_args([]).redis_url == DEFAULT_REDIS_URL
    assert bench_cli.build_parser().parse_args([]).redis_url == DEFAULT_REDIS_URL
    ingest = features_cli.build_parser().parse_args(["ingest", "x.csv", "--view", "items"])
    assert ingest.redis_url == DEFAULT_REDIS_URL


def test_no_other_local_redis_port_is_written_down() -> None:
    """Redis's own 6379 stays out of the code (Kubernetes' in-cluster `redis:6379` aside)."""
    pattern = re.compile(r"(127\.0\.0\.1|localhost):6379")
    offenders = [
        str(path.relative_to(ROOT))
        for package in ("infermesh", "services", "gateway")
        for path in (ROOT / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert not offenders
