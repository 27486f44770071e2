"""SCORING_INLINE_BATCH_ROWS reaches every instance a version is loaded with."""

from __future__ import annotations

from pathlib import Path

from infermesh.workload import modelgen
from services.runtime.settings import load_settings
from services.scoring.batcher import INLINE_MAX_ROWS
from services.scoring.config import read_config
from services.scoring.loading import LoadOptions, build_version
from services.scoring.service import ScoringSettings
from tests.two_input_model import two_input_model


def test_the_setting_defaults_to_the_batchers_limit_and_zero_turns_it_off() -> None:
    assert load_settings(ScoringSettings, {}).inline_batch_rows == INLINE_MAX_ROWS
    assert load_settings(ScoringSettings, {"SCORING_INLINE_BATCH_ROWS": "0"}).inline_batch_rows == 0


def test_loaded_instances_take_the_limit_from_the_load_options(tmp_path: Path) -> None:
    modelgen.write_config(tmp_path, "two", {"max_batch_size": 256, "instance_group": [{"count": 2}]})
    modelgen.write_version(tmp_path, "two", 1, two_input_model())
    config = read_config(tmp_path / "two")
    for limit in (0, 64):
        version = build_version(tmp_path / "two", 1, config, LoadOptions("cpu", 1, limit), ("test", limit))
        assert [instance.inline_max_rows for instance in version.instances] == [limit, limit]
        for instance in version.instances:
            instance.close()
