"""The pipeline file (services/runtime/pipeline.py): the demo is today's behaviour, and each
kind of mistake fails with a message naming the file, the field and what was expected."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from gateway.service import GatewaySettings, scored_model
from infermesh.pipeline import check_pipeline
from infermesh.pipeline import main as pipeline_cli
from infermesh.workload.model import IR_VERSION, OPSET
from services.features.pipeline_views import checked_registry, view_columns
from services.ranking import chain
from services.ranking.service import DEFAULT_CHAIN, RankingSettings, pipeline_settings
from services.runtime.pipeline import (
    DEMO_PIPELINE,
    STAGE_NAMES,
    FeatureColumn,
    PipelineError,
    PipelineFile,
    load_pipeline,
    pipeline_from_env,
)
from services.scoring.pipeline_models import check_models

DEMO_TEXT = DEMO_PIPELINE.read_text()


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def demo_with(tmp_path: Path, old: str, new: str) -> Path:
    assert old in DEMO_TEXT
    return write(tmp_path, DEMO_TEXT.replace(old, new))


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A repository whose ranker declares its input as `infermesh seed` writes it."""
    model = tmp_path / "models" / "ranker"
    model.mkdir(parents=True)
    config = {
        "max_batch_size": 4096,
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
    }
    (model / "config.json").write_text(json.dumps(config))
    return tmp_path / "models"


def failure(path: Path, repository: Path | None = None) -> str:
    with pytest.raises(PipelineError) as caught:
        check_pipeline(path, repository)
    return str(caught.value)


# ----------------------------------------------------------------------------- the demo


def test_the_demo_is_the_default_and_states_todays_behaviour() -> None:
    demo = load_pipeline()
    assert demo.path == DEMO_PIPELINE
    assert pipeline_from_env({}).spec == demo.spec
    model = demo.spec.model
    assert (model.name, model.output, [(i.name, i.dtype, i.columns) for i in model.inputs]) == (
        "ranker",
        "score",
        [("features", "FP32", ["user.vec", "item.vec"])],
    )
    assert ",".join(s.stage for s in demo.spec.ranking.stages) == DEFAULT_CHAIN
    assert demo.spec.fallback.model_name == "fallback-dot-product"
    assert demo.spec.features.registry is None  # the built-in reference views


def test_the_demo_gives_ranking_the_same_settings_as_before() -> None:
    assert pipeline_settings(RankingSettings(), load_pipeline()) == RankingSettings()


def test_the_stage_names_are_rankings_own() -> None:
    assert STAGE_NAMES == chain.STAGE_NAMES


def test_the_demo_passes_every_check_against_the_seeded_repository(repository: Path) -> None:
    assert check_pipeline(None, repository).spec.name == "demo"


def test_pipeline_check_cli_exit_codes(tmp_path: Path, repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline_cli(["check", str(DEMO_PIPELINE), "--model-repository", str(repository)]) == 0
    assert "pipeline 'demo' is valid" in capsys.readouterr().out
    bad = demo_with(tmp_path, "- stage: mmr", "- stage: boost")
    assert pipeline_cli(["check", str(bad), "--model-repository", str(repository)]) == 1
    assert "ranking.stages[4].stage: unknown stage 'boost'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- overrides


def test_a_set_ranking_variable_wins_over_the_file() -> None:
    settings = pipeline_settings(RankingSettings(chain="rules,mmr", mmr_top_n=7), load_pipeline())
    assert (settings.chain, settings.mmr_top_n, settings.mmr_lambda) == ("rules,mmr", 7, 1.0)


def test_stage_parameters_come_from_the_file(tmp_path: Path) -> None:
    path = demo_with(tmp_path, "      method: none", "      method: piecewise\n      points: [[0, 0], [1, 0.5]]")
    path.write_text(path.read_text().replace("lambda: 1.0", "lambda: 0.25"))
    settings = pipeline_settings(RankingSettings(), load_pipeline(path))
    assert (settings.calibration, settings.calibration_points, settings.mmr_lambda) == (
        "piecewise",
        "0.0:0.0,1.0:0.5",
        0.25,
    )
    assert settings.rules_min_score == -math.inf


def test_gateway_model_name_wins_over_the_file() -> None:
    model = scored_model(GatewaySettings(model_name="ranker-b"), load_pipeline())
    assert (model.name, model.inputs[0].name) == ("ranker-b", "features")
    assert scored_model(GatewaySettings(), load_pipeline()).name == "ranker"


# ----------------------------------------------------------------------------- views


def test_views_from_a_file_next_to_the_pipeline(tmp_path: Path) -> None:
    views = tmp_path / "views.yaml"
    views.write_text(
        "entities: {user: {}, item: {}}\n"
        "views:\n"
        "  user: {entity: user, features: [{name: vec, shape: 32}]}\n"
        "  item: {entity: item, features: [{name: vec, shape: 32}, {name: category, dtype: int32}]}\n"
    )
    path = demo_with(tmp_path, "features: {}", "features: {registry: views.yaml}")
    assert sorted(checked_registry(load_pipeline(path)).views) == ["item", "user"]


def test_views_embedded_in_the_pipeline(tmp_path: Path) -> None:
    embedded = (
        "features:\n  registry:\n    entities: {user: {}, item: {}}\n    views:\n"
        "      user: {entity: user, features: [{name: vec, shape: 32}]}\n"
        "      item: {entity: item, features: [{name: vec, shape: 32}]}\n"
    )
    path = demo_with(tmp_path, "features: {}\n", embedded)
    assert checked_registry(load_pipeline(path)).view("item").width == 32


def test_a_missing_views_file_is_named(tmp_path: Path) -> None:
    path = demo_with(tmp_path, "features: {}", "features: {registry: nowhere.yaml}")
    message = failure(path)
    assert message.startswith(f"{path}: features.registry: cannot read registry {tmp_path / 'nowhere.yaml'}")
    assert message.endswith("; expected a views file as docs/pipelines.md describes")


# ----------------------------------------------------------------------------- each mistake


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "columns: [user.vec, item.vec]",
            "columns: [user.vec, items.vec]",
            "models[0].inputs[0].columns[1]: no view 'items' is declared; expected one of the views item, user",
            id="missing view",
        ),
        pytest.param(
            "columns: [user.vec, item.vec]",
            "columns: [user.vec, item.vector]",
            "models[0].inputs[0].columns[1]: view 'item' has no feature 'vector'; "
            "expected one of its features vec, category, price",
            id="missing feature",
        ),
        pytest.param(
            "columns: [user.vec, item.vec]",
            "columns: [user.vec, item.category]",
            "models[0].inputs[0].columns[1]: item.category is int32; expected float32, as input 'features' is FP32",
            id="column dtype unlike its input",
        ),
        pytest.param(
            "- stage: category_cap",
            "- stage: category_limit",
            "ranking.stages[3].stage: unknown stage 'category_limit'; "
            "expected one of seen_filter, rules, calibration, category_cap, mmr",
            id="unknown stage",
        ),
        pytest.param(
            "dtype: FP32",
            "dtype: float",
            "models[0].inputs[0].dtype: got 'float'; expected 'FP32', 'FP64', 'INT32' or 'INT64'",
            id="input dtype not a tensor type",
        ),
    ],
)
def test_a_mistake_is_named_with_its_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = demo_with(tmp_path, old, new)
    assert failure(path) == f"{path}: {expected}"


def test_width_unlike_the_models(tmp_path: Path, repository: Path) -> None:
    path = demo_with(tmp_path, "columns: [user.vec, item.vec]", "columns: [user.vec, item.vec, item.price]")
    assert failure(path, repository) == (
        f"{path}: models[0].inputs[0].columns: 65 values per row; expected 64, "
        "the width of input 'features' (ranker/config.json)"
    )


def test_dtype_unlike_the_models(tmp_path: Path, repository: Path) -> None:
    path = demo_with(tmp_path, "dtype: FP32", "dtype: FP64")
    # The views hold float32: the columns fail first, naming what FP64 needs.
    assert "expected float64, as input 'features' is FP64" in failure(path)
    config = repository / "ranker" / "config.json"
    config.write_text(config.read_text().replace('"FP32", "shape": [-1, 64]', '"FP64", "shape": [-1, 64]'))
    assert failure(DEMO_PIPELINE, repository) == (
        f"{DEMO_PIPELINE}: models[0].inputs[0].dtype: FP32; expected FP64, "
        "the datatype of input 'features' (ranker/config.json)"
    )


def test_input_name_unlike_the_models(tmp_path: Path, repository: Path) -> None:
    path = demo_with(tmp_path, "- name: features", "- name: rows")
    assert failure(path, repository) == (
        f"{path}: models[0].inputs[0].name: model 'ranker' has no input 'rows'; "
        "expected one of 'features' FP32 [-1, 64] (ranker/config.json)\n"
        f"{path}: models[0].inputs: leaves out the model's inputs ['features']; "
        "expected every input: 'features' FP32 [-1, 64] (ranker/config.json)"
    )


def test_model_missing_from_the_repository(tmp_path: Path, repository: Path) -> None:
    path = demo_with(tmp_path, "  - name: ranker", "  - name: ranker-v2")
    assert failure(path, repository) == (
        f"{path}: models[0].name: no model 'ranker-v2' in the model repository {repository}"
    )
    check_models(load_pipeline(path), repository, require_all=False)  # a service checks what it holds


def test_stage_parameters_out_of_range(tmp_path: Path) -> None:
    path = demo_with(tmp_path, "lambda: 1.0", "lambda: 1.5")
    assert failure(path) == f"{path}: ranking.stages[4].lambda: got 1.5; expected less than or equal to 1"
    path = demo_with(tmp_path, "max_score: .inf", "max_score: -1")
    path.write_text(path.read_text().replace("min_score: -.inf", "min_score: 0"))
    assert (
        failure(path)
        == f"{path}: ranking.stages[1].max_score: -1 is below min_score 0; expected a bound some score can pass"
    )


def test_unknown_field_and_missing_field(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nname: x\nmodel: ranker\n")
    assert failure(path) == (
        f"{path}: models: required, missing\n"
        f"{path}: model: unknown field; expected only the fields docs/pipelines.md lists"
    )


def test_not_yaml_not_a_mapping_unreadable(tmp_path: Path) -> None:
    assert failure(write(tmp_path, "version: [1\n")).startswith(f"{tmp_path / 'pipeline.yaml'}: not valid YAML:")
    listed = write(tmp_path, "- 1\n", "list.yaml")
    assert failure(listed) == f"{listed}: expected a mapping with version, name, features, models, ranking, fallback"
    assert failure(tmp_path / "absent.yaml") == (
        f"{tmp_path / 'absent.yaml'}: cannot read the pipeline file: No such file or directory"
    )


def test_a_column_of_neither_the_users_nor_the_items_entity(tmp_path: Path) -> None:
    views = """\
        features:
          registry:
            entities: {user: {}, item: {}, shop: {}}
            views:
              user: {entity: user, features: [{name: vec, shape: 32}]}
              item: {entity: item, features: [{name: vec, shape: 32}, {name: category, dtype: int32}]}
              shop: {entity: shop, features: [{name: rating}]}
            reference: {user_view: user, item_view: item, category_feature: category}
    """
    path = demo_with(tmp_path, "features: {}\n", textwrap.dedent(views))
    path.write_text(path.read_text().replace("columns: [user.vec, item.vec]", "columns: [user.vec, shop.rating]"))
    assert failure(path) == (
        f"{path}: models[0].inputs[0].columns[1]: view 'shop' is of entity 'shop'; expected a view of the "
        "user's ('user') or the item's ('item') entity, as the views' reference section names them"
    )


# ----------------------------------------------------------------------------- ONNX inputs


def two_input_model(directory: Path) -> None:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])
    dense = helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 32])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["ids_f"], ["a"], keepdims=1),
            helper.make_node("ReduceSum", ["dense"], ["b"], keepdims=1),
            helper.make_node("Add", ["a", "b"], ["score"]),
        ],
        "two_inputs",
        [ids, dense],
        [score],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes(model.SerializeToString())


def test_inputs_read_from_the_onnx_file(tmp_path: Path) -> None:
    two_input_model(tmp_path / "models" / "ranker")
    views = (
        "features:\n  registry:\n    entities: {user: {}, item: {}}\n    views:\n"
        "      user: {entity: user, features: [{name: vec, shape: 32}]}\n"
        "      item: {entity: item, features: [{name: ids, dtype: int64, shape: 2}, {name: vec, shape: 32}]}\n"
    )
    inputs = (
        "    inputs:\n"
        "      - {name: ids, dtype: INT64, columns: [item.ids]}\n"
        "      - {name: dense, dtype: FP32, columns: [user.vec]}\n"
    )
    text = DEMO_TEXT.replace("features: {}\n", views)
    head, _, tail = text.partition("    inputs:\n")
    text = head + inputs + tail[tail.index("\n# The ranking chain") :]
    path = write(tmp_path, text)
    repository = tmp_path / "models"
    pipeline = load_pipeline(path)
    check_models(pipeline, repository, _columns(pipeline))
    wide = write(tmp_path, text.replace("columns: [user.vec]", "columns: [user.vec, item.vec]"), "wide.yaml")
    with pytest.raises(PipelineError) as caught:
        check_models(load_pipeline(wide), repository, _columns(load_pipeline(wide)))
    assert str(caught.value) == (
        f"{wide}: models[0].inputs[1].columns: 64 values per row; expected 32, "
        "the width of input 'dense' (ranker/1/model.onnx)"
    )


def _columns(pipeline: PipelineFile) -> dict[str, dict[str, FeatureColumn]]:
    return view_columns(checked_registry(pipeline))


# ----------------------------------------------------------------- what `check` adds


def test_an_output_the_model_does_not_have_is_refused(tmp_path: Path, repository: Path) -> None:
    bad = demo_with(tmp_path, "    output: score", "    output: nope")
    assert "models[0].output: ranker has no output 'nope'; its outputs: score" in failure(bad, repository)


def test_a_pinned_version_must_be_a_number_on_disk(tmp_path: Path, repository: Path) -> None:
    (repository / "ranker" / "1").mkdir()
    (repository / "ranker" / "1" / "model.onnx").write_bytes(b"")
    pinned = demo_with(tmp_path, "    output: score", '    version: "7"\n    output: score')
    assert "models[0].version: ranker has no version 7" in failure(pinned, repository)
    check_models(load_pipeline(pinned), repository, require_all=False)  # a service may see it published later
    named = demo_with(tmp_path, "    output: score", '    version: "latest"\n    output: score')
    assert "expected a version number" in failure(named)


def test_data_ingest_names_views_and_its_repository_exists(
    tmp_path: Path, repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = "data:\n  model_repository: models\n  ingest:\n    - {view: user, file: users.csv}\n"
    good = write(tmp_path, DEMO_TEXT + data)
    assert pipeline_cli(["check", str(good)]) == 0  # its own repository: tmp_path/models
    out = capsys.readouterr().out
    assert "note: data.ingest[0].file: no file" in out and "is valid" in out
    unknown = write(tmp_path, DEMO_TEXT + data.replace("view: user", "view: usr"), "unknown.yaml")
    assert "data.ingest[0].view: no view 'usr'" in failure(unknown)
    elsewhere = write(tmp_path, DEMO_TEXT + data.replace("models", "nowhere"), "elsewhere.yaml")
    assert pipeline_cli(["check", str(elsewhere)]) == 1
    assert "data.model_repository: no directory" in capsys.readouterr().err
