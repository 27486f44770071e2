"""A wrong pipeline file stops `infermesh up` before anything starts, and each service
before its server exists: non-zero exit, the message naming file, field and expectation,
no stack trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infermesh.up.supervisor import free_port
from services.runtime.pipeline import DEMO_PIPELINE
from tests.processes import start_up

# Never reached: every run here must stop before it talks to Redis.
UNUSED_REDIS = "redis://127.0.0.1:1/0"
UNKNOWN_STAGE = "ranking.stages[3].stage: unknown stage 'category_limit'; expected one of seen_filter, rules, "


def pipeline(tmp_path: Path, name: str, *replacements: tuple[str, str]) -> Path:
    text = DEMO_PIPELINE.read_text()
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def seeded_models(data_dir: Path) -> Path:
    """The ranker's declaration as `infermesh seed` writes it (the check reads no weights)."""
    ranker = data_dir / "models" / "ranker"
    ranker.mkdir(parents=True)
    inputs = [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]
    (ranker / "config.json").write_text(json.dumps({"max_batch_size": 4096, "inputs": inputs}))
    return data_dir / "models"


def run_up(tmp_path: Path, file: Path) -> tuple[int, str]:
    """Its exit status and output (stderr and stdout together)."""
    process = start_up(tmp_path / "data", UNUSED_REDIS, free_port(), "--pipeline", str(file))
    out, _ = process.communicate(timeout=60)
    return process.returncode, out


def test_up_refuses_an_unknown_stage_and_a_missing_view_before_starting_anything(tmp_path: Path) -> None:
    bad = pipeline(
        tmp_path,
        "bad.yaml",
        ("- stage: category_cap", "- stage: category_limit"),
        ("columns: [user.vec, item.vec]", "columns: [user.vec, items.vec]"),
    )
    code, out = run_up(tmp_path, bad)
    assert code == 1, out
    assert f"infermesh up: {bad}: {UNKNOWN_STAGE}" in out, out
    assert "Traceback" not in out
    assert "starting redis-server" not in out and "starting services" not in out


def test_up_refuses_columns_wider_than_the_models_input(tmp_path: Path) -> None:
    seeded_models(tmp_path / "data")
    wide = pipeline(
        tmp_path, "wide.yaml", ("columns: [user.vec, item.vec]", "columns: [user.vec, item.vec, item.price]")
    )
    code, out = run_up(tmp_path, wide)
    assert code == 1, out
    assert (
        f"infermesh up: {wide}: models[0].inputs[0].columns: 65 values per row; expected 64, "
        "the width of input 'features' (ranker/config.json)\n"
    ) in out, out
    assert "Traceback" not in out and "checking the demo data" not in out


def start_service(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, "OTEL_SDK_DISABLED": "true", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("module", "service", "replacement", "message"),
    [
        ("services.ranking", "ranking", ("- stage: category_cap", "- stage: category_limit"), UNKNOWN_STAGE),
        (
            "services.features",
            "features",
            ("columns: [user.vec, item.vec]", "columns: [user.vec, items.vec]"),
            "models[0].inputs[0].columns[1]: no view 'items' is declared; expected one of the views item, user",
        ),
        (
            "services.scoring",
            "scoring",
            ("- name: features", "- name: rows"),
            "models[0].inputs[0].name: model 'ranker' has no input 'rows'; expected one of 'features' FP32 [-1, 64]",
        ),
        (
            "gateway",
            "gateway",
            ("output: score", "output: score\n    extra: 1"),
            "models[0].extra: unknown field; expected only the fields docs/pipelines.md lists",
        ),
    ],
)
def test_each_service_refuses_a_wrong_pipeline_before_serving(
    tmp_path: Path, module: str, service: str, replacement: tuple[str, str], message: str
) -> None:
    bad = pipeline(tmp_path, "bad.yaml", replacement)
    prefix = service.upper()
    env = {
        "INFERMESH_PIPELINE": str(bad),
        f"{prefix}_PORT": str(free_port()),
        f"{prefix}_REDIS_URL": UNUSED_REDIS,
        "SCORING_MODEL_REPOSITORY": str(seeded_models(tmp_path / "data")),
    }
    if service == "scoring":
        env.pop("SCORING_REDIS_URL")
    finished = start_service(module, env)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert f"{service}: {bad}: {message}" in finished.stderr, finished.stderr
    assert "Traceback" not in finished.stdout + finished.stderr
    assert "listening" not in finished.stdout + finished.stderr
