"""What the model tools take as a model name (one directory of the repository) and a version."""

from __future__ import annotations

import argparse

import pytest

from infermesh.models.names import model_name, model_version


@pytest.mark.parametrize("name", ["ranker", "churn_v2", "a.b-c", "X" * 128])
def test_model_names_that_are_one_directory(name: str) -> None:
    assert model_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "/abs", "-x", ".hidden", "a b", "X" * 129])
def test_model_names_that_would_leave_the_model_directory(name: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a model name") as refused:
        model_name(name)
    assert len(str(refused.value)) < 200  # a long name is cut, not echoed whole


def test_model_versions_start_at_one() -> None:
    assert model_version("3") == 3
    for text in ("0", "-1", "abc", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a model version"):
            model_version(text)
