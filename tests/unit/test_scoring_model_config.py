"""ModelConfig's answer: a served version's config.json in Triton's model_config.proto layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from services.genproto.inference import model_config_pb2 as mc
from services.scoring.config import PROVENANCE_FILE, ConfigError, TensorSpec, parse_config, read_provenance
from services.scoring.models import ModelVersion
from services.scoring.providers import CPU, CUDA
from services.scoring.service import TRITON_DATA_TYPES, triton_model_config
from services.scoring.tensors import DATATYPES


def served(
    doc: dict[str, Any], inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], provider: str = CPU
) -> ModelVersion:
    """A version as the repository serves it, without sessions (ModelConfig never runs one)."""
    return ModelVersion(
        config=parse_config("ranker", doc),
        version=3,
        path=Path("ranker/3/model.onnx"),
        fingerprint=(),
        instances=(),
        inputs=inputs,
        outputs=outputs,
        session_outputs=tuple(o.name for o in outputs),
        provider=provider,
        provider_reason="test",
        io_binding=False,
        device_ids=(0, 1) if provider != CPU else (),
        byte_size=0,
    )


FEATURES = (TensorSpec("features", "FP32", (-1, 64)),)
SCORE = (TensorSpec("score", "FP32", (-1, 1)),)


def test_every_datatype_has_its_triton_enum_value() -> None:
    assert set(TRITON_DATA_TYPES) == DATATYPES
    assert TRITON_DATA_TYPES["FP32"] == mc.TYPE_FP32 == 11
    assert TRITON_DATA_TYPES["INT64"] == mc.TYPE_INT64 == 9
    assert TRITON_DATA_TYPES["BYTES"] == mc.TYPE_STRING == 13
    assert TRITON_DATA_TYPES["BOOL"] == mc.TYPE_BOOL == 1


def test_batching_model_dims_leave_out_the_batch_dimension() -> None:
    doc = {
        "max_batch_size": 1024,
        "dynamic_batching": {
            "max_queue_delay_microseconds": 500,
            "preferred_batch_size": [256, 64],
            "max_queue_size": 100,
            "default_timeout_microseconds": 7,
            "priority_levels": 3,
        },
        "version_policy": {"latest": {"num_versions": 2}},
        "warmup": [{"batch_size": 8, "data": "random"}],
        "response_cache": {"enable": True},
    }
    config = triton_model_config(served(doc, FEATURES, SCORE))
    assert json_format.MessageToDict(config, preserving_proto_field_name=True) == {
        "name": "ranker",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 2}},
        "max_batch_size": 1024,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": ["64"]}],
        "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": ["1"]}],
        "instance_group": [{"name": "ranker_0", "kind": "KIND_CPU", "count": 1}],
        "default_model_filename": "model.onnx",
        "dynamic_batching": {
            "preferred_batch_size": [64, 256],
            "max_queue_delay_microseconds": "500",
            "priority_levels": "3",
            "default_priority_level": "3",
            "default_queue_policy": {"default_timeout_microseconds": "7", "max_queue_size": 100},
        },
        "model_warmup": [
            {
                "name": "warmup_0",
                "batch_size": 8,
                "inputs": {"features": {"data_type": "TYPE_FP32", "dims": ["64"], "random_data": True}},
            }
        ],
        "response_cache": {"enable": True},
    }
    assert not config.parameters


def test_unbatched_model_dims_are_the_whole_shape() -> None:
    inputs = (TensorSpec("a", "INT64", (-1, 4)), TensorSpec("text", "BYTES", (1,)))
    outputs = (TensorSpec("sum", "INT64", (-1, 4)),)
    doc = {"max_batch_size": 0, "warmup": [{"batch_size": 2}], "version_policy": {"specific": {"versions": [1, 3]}}}
    config = triton_model_config(served(doc, inputs, outputs))
    assert config.max_batch_size == 0 and config.WhichOneof("scheduling_choice") is None
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("a", mc.TYPE_INT64, [-1, 4]),
        ("text", mc.TYPE_STRING, [1]),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("sum", mc.TYPE_INT64, [-1, 4])]
    assert list(config.version_policy.specific.versions) == [1, 3]
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1 and list(warmup.inputs["a"].dims) == [2, 4] and warmup.inputs["a"].zero_data
    assert not config.HasField("response_cache")


def test_batching_switched_off_reports_max_batch_size_zero() -> None:
    config = triton_model_config(served({"max_batch_size": 64, "dynamic_batching": None}, FEATURES, SCORE))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [-1, 64]


def test_gpu_instance_groups_count_instances_per_gpu() -> None:
    even = triton_model_config(served({"instance_group": [{"count": 4, "gpus": [0, 1]}]}, FEATURES, SCORE, CUDA))
    assert [(g.kind, g.count, list(g.gpus)) for g in even.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, 2, [0, 1])
    ]
    uneven = triton_model_config(served({"instance_group": [{"count": 3, "gpus": [0, 1]}]}, FEATURES, SCORE, CUDA))
    assert [(g.name, g.count, list(g.gpus)) for g in uneven.instance_group] == [
        ("ranker_0", 2, [0]),
        ("ranker_1", 1, [1]),
    ]
    # Asked for GPUs but running on the CPU (no CUDA here): what runs is what is reported.
    fallback = triton_model_config(served({"instance_group": [{"count": 2, "gpus": [0]}]}, FEATURES, SCORE, CPU))
    assert [(g.kind, g.count, list(g.gpus)) for g in fallback.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 2, [])
    ]


def test_provenance_becomes_parameters(tmp_path: Path) -> None:
    doc = {"provenance": {"owner": "ranking-team", "training_data_digest": "sha256:ab12", "source_revision": "9f1c"}}
    model = served(doc, FEATURES, SCORE)
    parameters = triton_model_config(model).parameters
    assert {k: v.string_value for k, v in parameters.items()} == doc["provenance"]


def test_a_version_provenance_file_overrides_the_configs(tmp_path: Path) -> None:
    version = tmp_path / "ranker" / "3"
    version.mkdir(parents=True)
    (version / PROVENANCE_FILE).write_text(
        json.dumps({"source_revision": "a1b2", "parity": {"rows": 512}, "epochs": 3})
    )
    config = parse_config("ranker", {"provenance": {"owner": "ranking-team", "source_revision": "old"}})
    assert read_provenance(version, config.provenance) == {
        "owner": "ranking-team",
        "source_revision": "a1b2",
        "parity": '{"rows": 512}',
        "epochs": "3",
    }
    assert read_provenance(tmp_path / "ranker" / "4", config.provenance) == {
        "owner": "ranking-team",
        "source_revision": "old",
    }
    (version / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="provenance.json is not readable JSON"):
        read_provenance(version, config.provenance)
    with pytest.raises(ConfigError, match="provenance must be an object"):
        parse_config("ranker", {"provenance": ["owner"]})
