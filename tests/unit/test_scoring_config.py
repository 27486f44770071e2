"""config.json parsing: Triton-like keys, defaults, and loud failures on mistakes."""

from __future__ import annotations

import pytest

from services.scoring.config import (
    DEFAULT_MAX_QUEUE_SIZE,
    BatchingPolicy,
    CachePolicy,
    ConfigError,
    TensorSpec,
    VersionPolicy,
    WarmupSpec,
    parse_config,
)


def test_full_config() -> None:
    config = parse_config(
        "ranker",
        {
            "name": "ranker",
            "max_batch_size": 1024,
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "score", "data_type": "TYPE_FP32", "dims": [1]}],  # Triton style
            "dynamic_batching": {
                "max_queue_delay_microseconds": 500,
                "preferred_batch_size": [256, 64],
                "max_queue_size": 100,
                "priority_levels": 3,
            },
            "instance_group": [{"count": 2, "kind": "KIND_GPU", "gpus": [0, 1]}],
            "execution_providers": ["tensorrt", "cuda", "cpu"],
            "version_policy": {"latest": {"num_versions": 2}},
            "warmup": [{"batch_size": 256, "data": "random"}],
            "response_cache": {"enable": True, "ttl_seconds": 30},
        },
    )
    assert config.inputs == (TensorSpec("features", "FP32", (-1, 64)),)
    assert config.outputs == (TensorSpec("score", "FP32", (-1, 1)),)
    assert config.batching == BatchingPolicy(1024, 500, (64, 256), 100, priority_levels=3, default_priority_level=3)
    assert (config.instance_count, config.gpus) == (2, (0, 1))
    assert config.execution_providers == ("tensorrt", "cuda", "cpu")
    assert config.version_policy == VersionPolicy("latest", num_versions=2)
    assert config.warmup == (WarmupSpec(256, "random"),)
    assert config.cache == CachePolicy(True, 30)


def test_defaults_batch_without_delay_and_bound_the_queue() -> None:
    config = parse_config("m", {"max_batch_size": 8})
    assert config.batching == BatchingPolicy(max_batch_size=8, max_queue_size=DEFAULT_MAX_QUEUE_SIZE)
    assert config.version_policy.select([1, 3, 2]) == [3]
    assert config.warmup == (WarmupSpec(1, "zero"),) and not config.cache.enable


def test_batching_can_be_turned_off() -> None:
    assert parse_config("m", {"max_batch_size": 8, "dynamic_batching": None}).batching.max_batch_size == 0
    assert parse_config("m", {}).batching.max_batch_size == 0


@pytest.mark.parametrize(
    ("policy", "available", "chosen"),
    [
        ({"latest": {"num_versions": 2}}, [1, 5, 3], [3, 5]),
        ({"specific": {"versions": [1, 4]}}, [1, 2, 3, 4], [1, 4]),
        ({"specific": {"versions": [9]}}, [1, 2], []),
        ({"all": {}}, [2, 1], [1, 2]),
    ],
)
def test_version_policies(policy: dict, available: list[int], chosen: list[int]) -> None:
    assert parse_config("m", {"version_policy": policy}).version_policy.select(available) == chosen


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"max_batch_sise": 8}, "unknown keys ['max_batch_sise']"),
        ({"name": "other"}, "lives in directory 'm'"),
        ({"max_batch_size": -1}, "max_batch_size must be an integer >= 0"),
        ({"max_batch_size": 8, "dynamic_batching": {"preferred_batch_size": [16]}}, "exceeds max_batch_size 8"),
        ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1]}]}, "datatype 'FP99'"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "shape must be a list of integers"),
        ({"version_policy": {"latest": {}, "all": {}}}, "exactly one"),
        ({"execution_providers": ["gpu"]}, "execution_providers must be"),
        ({"warmup": [{"batch_size": 4, "data": "ones"}]}, "data must be one of"),
        ({"max_batch_size": 2, "warmup": [{"batch_size": 4}]}, "exceed max_batch_size 2"),
        ({"response_cache": {"enable": "yes"}}, "enable must be true or false"),
        (
            {"max_batch_size": 8, "dynamic_batching": {"priority_levels": 2, "default_priority_level": 3}},
            "within 1..priority_levels",
        ),
        ({"instance_group": [{"count": 0}]}, "count must be an integer >= 1"),
    ],
)
def test_mistakes_are_rejected_with_the_key_named(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_config("m", doc)


def test_triton_dims_leave_out_the_batch_dimension() -> None:
    # A config copied from Triton: dims without the batch dimension when max_batch_size > 0.
    triton = {
        "max_batch_size": 64,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}],
        "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": [1]}],
    }
    config = parse_config("ranker", triton)
    assert [(s.name, s.datatype, s.shape) for s in (*config.inputs, *config.outputs)] == [
        ("features", "FP32", (-1, 64)),
        ("score", "FP32", (-1, 1)),
    ]
    unbatched = parse_config("ranker", {**triton, "max_batch_size": 0})
    assert unbatched.inputs[0].shape == (64,)
    # Our own `shape` is the whole shape either way.
    assert parse_config(
        "ranker", {"max_batch_size": 64, "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}]}
    ).inputs[0].shape == (-1, 64)
    with pytest.raises(ConfigError, match="both shape and dims"):
        parse_config("ranker", {"inputs": [{"name": "f", "datatype": "FP32", "shape": [-1, 64], "dims": [64]}]})
