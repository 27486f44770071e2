"""Feature view declarations: parsing, validation, and the record layout they imply."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from services.features.layout import ITEM_RECORD, USER_RECORD
from services.features.registry import TIMESTAMP_FIELD, RegistryError, load_registry, parse_registry
from services.runtime.errors import InvalidArgument, NotFound

VIEWS = """
entities:
  item: {id_column: item_id}
  user: {}
views:
  emb:
    entity: item
    key: e
    ttl_seconds: 60
    features:
      - {name: vec, dtype: float32, shape: 4, default: [1, 2, 3, 4]}
      - {name: cat, dtype: int32, default: -1}
      - {name: score, dtype: float64}
  stats:
    entity: item
    features:
      - {name: clicks, dtype: int64, default: 0}
  profile:
    entity: user
    features:
      - {name: age, dtype: float32, default: 30}
"""


def registry_from(text: str):
    return parse_registry(yaml.safe_load(text))


def test_built_in_registry_matches_the_seeded_reference_layout() -> None:
    registry = load_registry()
    assert registry.views["user"].record_dtype == USER_RECORD
    assert registry.views["item"].record_dtype == ITEM_RECORD
    assert registry.reference is not None and registry.reference.item_view == "item"
    assert registry.retrieval is not None and registry.retrieval.vector_feature == "vec"
    assert registry.views["item"].width == 34


def test_view_layout_defaults_and_columns() -> None:
    view = registry_from(VIEWS).views["emb"]
    assert view.timestamped and view.ttl_seconds == 60
    assert view.record_dtype.names == ("vec", "cat", "score", TIMESTAMP_FIELD)
    assert view.record_dtype.itemsize == 4 * 4 + 4 + 8 + 8
    assert view.columns == ["emb.vec[0]", "emb.vec[1]", "emb.vec[2]", "emb.vec[3]", "emb.cat", "emb.score"]
    np.testing.assert_array_equal(view.default_row, np.array([1, 2, 3, 4, -1, 0], dtype=np.float32))
    default = np.frombuffer(view.default_record, dtype=view.record_dtype)[0]
    assert default["cat"] == -1 and list(default["vec"]) == [1, 2, 3, 4]
    assert registry_from(VIEWS).views["stats"].id_column == "item_id"
    assert registry_from(VIEWS).views["profile"].id_column == "user_id"


def test_resolve_checks_views_share_an_entity() -> None:
    registry = registry_from(VIEWS)
    assert [v.name for v in registry.resolve(["emb", "stats"])] == ["emb", "stats"]
    with pytest.raises(InvalidArgument, match="mix entity types"):
        registry.resolve(["emb", "profile"])
    with pytest.raises(NotFound, match="unknown feature view 'nope'"):
        registry.resolve(["nope"])
    with pytest.raises(InvalidArgument, match="repeated"):
        registry.resolve(["emb", "emb"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("dtype: float32, shape: 4, default: [1, 2, 3, 4]}", None),
        ("dtype: float16, shape: 4}", "dtype 'float16'"),
        ("dtype: float32, shape: 0}", "shape must be a positive integer"),
        ("dtype: float32, shape: 4, default: [1, 2]}", "default must be"),
        ("dtype: float32, shape: 4, default: .nan}", "finite"),
    ],
)
def test_feature_declarations_are_validated(change: str, message: str | None) -> None:
    text = VIEWS.replace("dtype: float32, shape: 4, default: [1, 2, 3, 4]}", change)
    if message is None:
        registry_from(text)
    else:
        with pytest.raises(RegistryError, match=message):
            registry_from(text)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("key: e", "key: meta", "key 'meta'"),
        ("key: e", "key: stats", "view keys must be unique"),
        ("entity: user", "entity: shop", "not declared under `entities`"),
        ("ttl_seconds: 60", "ttl_seconds: -1", "ttl_seconds"),
        ("ttl_seconds: 60", "ttl_seconds: 60\n    timestamped: false", "needs timestamped"),
        ("{name: cat, dtype: int32, default: -1}", "{name: cat, dtype: int32, default: 1.5}", "integer"),
    ],
)
def test_view_declarations_are_validated(old: str, new: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        registry_from(VIEWS.replace(old, new, 1))


def test_unreadable_registry_names_the_file(tmp_path) -> None:
    bad = tmp_path / "views.yaml"
    bad.write_text("views: [oops")
    with pytest.raises(RegistryError, match="views.yaml"):
        load_registry(bad)


def test_views_yaml_of_the_built_in_registry_round_trips(tmp_path, capsys) -> None:
    from infermesh.features.cli import main

    assert main(["views", "--yaml"]) == 0
    path = tmp_path / "views.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_registry(path).views["item"].record_dtype == ITEM_RECORD
    assert main(["views", "--registry", str(path)]) == 0
    assert "item: entity item (id column item_id), 34 columns" in capsys.readouterr().out
