"""config.pbtxt: Triton's model configuration read with text_format against model_config.proto,
mapped onto the scoring ModelConfig; unsupported fields named with their lines; errors naming
the file, the line and the field; config.json's precedence; the checks against the ONNX model."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from infermesh.workload import modelgen
from infermesh.workload.model import IR_VERSION, OPSET
from services.genproto.inference import model_config_pb2 as mc
from services.scoring.config import (
    DEFAULT_MAX_QUEUE_SIZE,
    BatchingPolicy,
    CachePolicy,
    ConfigError,
    TensorSpec,
    VersionPolicy,
    WarmupSpec,
)
from services.scoring.discovery import read_model_config
from services.scoring.loading import _tensor_specs
from services.scoring.pbtxt import DATATYPE_OF_TRITON, field_lines, read_pbtxt
from services.scoring.tensors import DATATYPES

MODEL_DIR = Path("/repository/ranker")

FULL = """\
# Every field this server acts on.
name: "ranker"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
max_batch_size: 64
default_model_filename: "model.onnx"
input [
  {
    name: "features"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [ { name: "score", data_type: TYPE_FP32, dims: [ 1 ] } ]
dynamic_batching {
  preferred_batch_size: [ 32, 8 ]
  max_queue_delay_microseconds: 500
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { default_timeout_microseconds: 7000 max_queue_size: 100 }
}
instance_group [ { name: "ranker_gpu" count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]
optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
version_policy: { latest: { num_versions: 2 } }
model_warmup [
  { name: "one", batch_size: 1, inputs { key: "features" value: { zero_data: true } } },
  { name: "many", batch_size: 16, inputs { key: "features" value: { random_data: true } } }
]
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
response_cache { enable: true }
"""


def parse(text: str, directory: Path = MODEL_DIR):
    return read_pbtxt(directory, textwrap.dedent(text))


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as raised:
        parse(text)
    return str(raised.value)


def test_every_supported_field_is_mapped() -> None:
    config = parse(FULL)
    assert config.name == "ranker"
    assert config.inputs == (TensorSpec("features", "FP32", (-1, 64)),)
    assert config.outputs == (TensorSpec("score", "FP32", (-1, 1)),)
    assert config.batching == BatchingPolicy(
        max_batch_size=64,
        max_queue_delay_microseconds=500,
        preferred_batch_sizes=(8, 32),
        max_queue_size=100,
        default_timeout_microseconds=7000,
        priority_levels=3,
        default_priority_level=2,
    )
    # Triton's count is per listed GPU: 2 on GPU 0 and 2 on GPU 1, TensorRT first.
    assert (config.instance_count, config.gpus, config.execution_providers) == (4, (0, 0, 1, 1), ("tensorrt",))
    assert config.version_policy == VersionPolicy("latest", num_versions=2)
    assert config.warmup == (WarmupSpec(1, "zero"), WarmupSpec(16, "random"))
    assert config.intra_op_threads == 2
    assert config.cache == CachePolicy(enable=True)
    assert config.warnings == ()
    assert config.source.file == "ranker/config.pbtxt"
    assert config.source.lines["input[0].dims"] == 11


def test_defaults_of_a_minimal_file() -> None:
    config = parse('platform: "onnxruntime_onnx"\n')
    assert config.batching == BatchingPolicy(max_batch_size=0)
    assert (config.inputs, config.outputs) == ((), ())  # the model file says them
    assert (config.instance_count, config.gpus, config.execution_providers) == (1, (), ())
    assert config.version_policy == VersionPolicy()
    assert config.warmup == (WarmupSpec(),)
    assert config.intra_op_threads == 0 and not config.cache.enable


def test_batching_without_dynamic_batching_keeps_a_bounded_queue() -> None:
    config = parse("max_batch_size: 8\n")
    assert config.batching == BatchingPolicy(max_batch_size=8, max_queue_size=DEFAULT_MAX_QUEUE_SIZE)


@pytest.mark.parametrize("triton", sorted(mc.DataType.keys()))
def test_data_types_map_to_the_open_inference_protocol(triton: str) -> None:
    text = f'input [ {{ name: "x" data_type: {triton} dims: [ 2, -1 ] }} ]\n'
    expected = {"TYPE_STRING": "BYTES"}.get(triton, triton.removeprefix("TYPE_"))
    if expected in DATATYPES:
        assert parse(text).inputs == (TensorSpec("x", expected, (2, -1)),)
    else:  # TYPE_INVALID, TYPE_BF16: nothing in ONNX Runtime's Python API carries them
        expected_message = rf"ranker/config\.pbtxt:1: input\[0\]\.data_type: {triton} is not supported; use one of"
        assert re.match(expected_message, error_of(text))


def test_every_open_inference_protocol_datatype_has_a_triton_type() -> None:
    assert set(DATATYPE_OF_TRITON.values()) == DATATYPES
    assert DATATYPE_OF_TRITON[mc.TYPE_FP32] == "FP32" and DATATYPE_OF_TRITON[mc.TYPE_STRING] == "BYTES"


def test_dims_are_whole_shapes_without_batching() -> None:
    config = parse('max_batch_size: 0\ninput [ { name: "x" data_type: TYPE_INT64 dims: [ 3, 4 ] } ]\n')
    assert config.inputs == (TensorSpec("x", "INT64", (3, 4)),)


@pytest.mark.parametrize(
    ("text", "policy", "available", "chosen"),
    [
        ("version_policy: { latest: { num_versions: 2 } }", VersionPolicy("latest", 2), [1, 5, 3], [3, 5]),
        ("version_policy { all { } }", VersionPolicy("all"), [2, 1], [1, 2]),
        (
            "version_policy: { specific: { versions: [ 1, 3 ] } }",
            VersionPolicy("specific", versions=(1, 3)),
            [1, 2],
            [1],
        ),
        ("", VersionPolicy("latest", 1), [1, 2], [2]),
    ],
)
def test_version_policies(text: str, policy: VersionPolicy, available: list[int], chosen: list[int]) -> None:
    config = parse(text + "\n")
    assert config.version_policy == policy
    assert config.version_policy.select(available) == chosen


@pytest.mark.parametrize(
    ("text", "count", "gpus", "providers"),
    [
        ("instance_group [ { count: 3 kind: KIND_CPU } ]", 3, (), ("cpu",)),
        ("instance_group [ { kind: KIND_CPU } ]", 1, (), ("cpu",)),  # count 0 means 1, as in Triton
        ("instance_group [ { count: 2 kind: KIND_GPU } ]", 2, (0, 0), ("cuda",)),
        (
            "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 1 ] }, { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]",
            3,
            (1, 0, 0),
            ("cuda",),
        ),
        ("instance_group [ { count: 2 gpus: [ 3 ] } ]", 2, (3, 3), ("cuda",)),  # KIND_AUTO with gpus: on them
        ("instance_group [ { count: 2 kind: KIND_AUTO } ]", 2, (), ()),  # the server's SCORING_PROVIDERS
        ("instance_group [ { count: 2 kind: KIND_MODEL } ]", 2, (), ()),
    ],
)
def test_instance_groups(text: str, count: int, gpus: tuple[int, ...], providers: tuple[str, ...]) -> None:
    config = parse(text + "\n")
    assert (config.instance_count, config.gpus, config.execution_providers) == (count, gpus, providers)


def test_warmup_and_dynamic_batching_limits() -> None:
    assert parse("max_batch_size: 4\nmodel_warmup [ { batch_size: 4 } ]\n").warmup == (WarmupSpec(4, "zero"),)
    too_big = error_of("max_batch_size: 4\nmodel_warmup [ { batch_size: 8 } ]\n")
    assert too_big == "ranker/config.pbtxt:2: model_warmup[0].batch_size: 8 must be within 1..4"


def test_unsupported_fields_are_named_with_their_lines() -> None:
    config = parse(
        """\
        max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] format: FORMAT_NHWC } ]
        dynamic_batching {
          max_queue_delay_microseconds: 100
          preserve_ordering: true
          priority_queue_policy { key: 1 value: { max_queue_size: 3 } }
        }
        optimization { cuda { graphs: true } }
        parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
        parameters { key: "execution_mode" value: { string_value: "1" } }
        default_model_filename: "weights.onnx"
        model_warmup { batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: 4 zero_data: true } } }
        metric_tags { key: "team" value: "search" }
        """
    )
    assert config.warnings == (
        "ranker/config.pbtxt: not supported, ignored: "
        "input[0].format (line 2), "
        'default_model_filename "weights.onnx" (line 11), '
        "metric_tags (line 13), "
        "dynamic_batching.preserve_ordering (line 5), "
        "dynamic_batching.priority_queue_policy (line 6), "
        "optimization.cuda (line 8), "
        'parameters["execution_mode"] (line 10), '
        'model_warmup[0].inputs["x"].data_type (line 12), '
        'model_warmup[0].inputs["x"].dims (line 12)',
    )
    # What it does act on still applies.
    assert config.batching.max_queue_delay_microseconds == 100 and config.intra_op_threads == 1


def test_fields_that_only_other_schedulers_use_are_reported() -> None:
    config = parse("max_batch_size: 4\nsequence_batching { max_sequence_idle_microseconds: 5 }\n")
    assert config.warnings == ("ranker/config.pbtxt: not supported, ignored: sequence_batching (line 2)",)
    unbatched = parse("max_batch_size: 0\ndynamic_batching { }\n")
    assert unbatched.warnings == (
        "ranker/config.pbtxt: not supported, ignored: dynamic_batching (line 2) with max_batch_size 0",
    )


def test_an_accelerator_other_than_tensorrt_is_reported_and_not_used() -> None:
    config = parse(
        "instance_group [ { kind: KIND_GPU } ]\n"
        'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "openvino" } ] } }\n'
    )
    assert config.execution_providers == ("cuda",)
    assert config.warnings == (
        "ranker/config.pbtxt: not supported, ignored: "
        'optimization.execution_accelerators.gpu_execution_accelerator[0].name "openvino" (line 2)',
    )


ONNX_ONLY = "this server runs ONNX models"
ERRORS = [
    # Not Triton's ModelConfig at all: text_format's line:column and the field.
    (
        'name: "ranker"\nmax_batch_sise: 8\n',
        'ranker/config.pbtxt:2:1: Message type "inference.ModelConfig" has no field named "max_batch_sise".',
    ),
    ('max_batch_size: "8"\n', 'ranker/config.pbtxt:1:17: \'max_batch_size: "8"\': Couldn\'t parse integer: "8"'),
    (
        'input [ { name: "x" data_type: FP32 } ]\n',
        "ranker/config.pbtxt:1:32: 'input [ { name: \"x\" data_type: FP32 } ]': "
        'Enum type "inference.DataType" has no value named FP32.',
    ),
    (
        "dynamic_batching { }\nsequence_batching { }\n",
        'ranker/config.pbtxt:2:1: Field "sequence_batching" is specified along with field "dynamic_batching", '
        'another member of oneof "scheduling_choice" for message type "inference.ModelConfig".',
    ),
    ('max_batch_size: 8\ninput [ { name: "x"\n', 'ranker/config.pbtxt:2:17: Expected "}".'),
    # Parsed, but not something this server can run: the field's line.
    (
        'name: "ranker"\nplatform: "tensorrt_plan"\n',
        f"ranker/config.pbtxt:2: platform: platform 'tensorrt_plan' is not supported: {ONNX_ONLY} "
        "(platform 'onnxruntime_onnx')",
    ),
    (
        '\n\nbackend: "python"\n',
        f"ranker/config.pbtxt:3: backend: backend 'python' is not supported: {ONNX_ONLY} (backend 'onnxruntime')",
    ),
    ('name: "other"\n', "ranker/config.pbtxt:1: name: names model 'other', but the directory is 'ranker'"),
    ("max_batch_size: -1\n", "ranker/config.pbtxt:1: max_batch_size: must be >= 0, got -1"),
    ("input [ { data_type: TYPE_FP32 dims: [ 1 ] } ]\n", "ranker/config.pbtxt:1: input[0]: needs a name"),
    (
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ -2 ] } ]\n',
        "ranker/config.pbtxt:1: output[0].dims: [-2]: each must be >= 0, or -1 for any size",
    ),
    (
        "max_batch_size: 4\ndynamic_batching {\n  preferred_batch_size: [ 8 ]\n}\n",
        "ranker/config.pbtxt:3: dynamic_batching.preferred_batch_size: [8]: each must be within 1..4 (max_batch_size)",
    ),
    (
        "max_batch_size: 4\ndynamic_batching { priority_levels: 2 }\n",
        "ranker/config.pbtxt:2: dynamic_batching.default_priority_level: 0 must be within 1..priority_levels (2)",
    ),
    ("version_policy: { latest: { } }\n", "ranker/config.pbtxt:1: version_policy.latest.num_versions: must be >= 1"),
    (
        "version_policy: { specific: { } }\n",
        "ranker/config.pbtxt:1: version_policy.specific.versions: []: give versions >= 1",
    ),
    (
        "instance_group [ { kind: KIND_CPU }, { kind: KIND_GPU } ]\n",
        "ranker/config.pbtxt:1: instance_group: mixes kinds ['cpu', 'gpu']; one kind per model is supported",
    ),
    (
        "instance_group [\n  { kind: KIND_CPU gpus: [ 0 ] }\n]\n",
        "ranker/config.pbtxt:2: instance_group[0].gpus: KIND_CPU takes no gpus",
    ),
    (
        'parameters { key: "intra_op_thread_count" value: { string_value: "two" } }\n',
        "ranker/config.pbtxt:1: parameters[\"intra_op_thread_count\"]: 'two' must be a whole number >= 0",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_name_the_file_the_line_and_the_field(text: str, message: str) -> None:
    assert error_of(text) == message


def test_field_lines_follow_lists_maps_and_nesting() -> None:
    text = textwrap.dedent(
        """\
        input [
          { name: "a" },
          {
            name: "b"
            dims: [ 1,
                    2 ]
          }
        ]
        input { name: "c" }
        parameters: { key: "k", value: { string_value: 'v' } }
        'ignored' # a comment: { [ "
        """
    )
    lines = field_lines(text.replace("'ignored' # a comment: { [ \"\n", ""), mc.ModelConfig.DESCRIPTOR)
    assert lines["input[0]"] == 2 and lines["input[1].name"] == 4
    assert lines["input[1].dims[1]"] == 6
    assert lines["input[2].name"] == 9
    assert lines['parameters["k"].string_value'] == 10


# ------------------------------------------------------------------ which file a model uses


def model_dir(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "ranker"
    directory.mkdir()
    for name, text in files.items():
        (directory / name.replace("_", ".")).write_text(text)
    return directory


def test_config_pbtxt_alone_is_read(tmp_path: Path) -> None:
    config, _ = read_model_config(model_dir(tmp_path, config_pbtxt="max_batch_size: 8\n"), None)
    assert config.batching.max_batch_size == 8 and config.source.file == "ranker/config.pbtxt"


def test_config_json_wins_over_config_pbtxt_and_says_so(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, config_json='{"max_batch_size": 4}', config_pbtxt="max_batch_size: 8\n")
    config, digest = read_model_config(directory, None)
    assert config.batching.max_batch_size == 4 and config.source.file == "ranker/config.json"
    assert config.warnings == ("ranker/config.pbtxt ignored: config.json takes precedence over it",)
    # A load request's config wins over both; each source gives another digest (a reload).
    override, override_digest = read_model_config(directory, '{"max_batch_size": 2}')
    assert override.batching.max_batch_size == 2 and override_digest != digest
    (directory / "config.json").unlink()
    assert read_model_config(directory, None)[1] != digest


def test_a_broken_config_pbtxt_fails_with_its_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^ranker/config\.pbtxt:2:1: .*no field named \"dynamic_batchin\""):
        read_model_config(model_dir(tmp_path, config_pbtxt="max_batch_size: 8\ndynamic_batchin { }\n"), None)


# ------------------------------------------------------------------ checks against the ONNX model


def session() -> ort.InferenceSession:
    return ort.InferenceSession(modelgen.mlp_model(1), providers=["CPUExecutionProvider"])


TENSORS = """\
max_batch_size: 8
input [
  {
    name: "features"
    data_type: TYPE_FP32
    dims: [ 64 ]
  }
]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
"""


def mismatch(old: str, new: str) -> str:
    config = parse(TENSORS.replace(old, new))
    with pytest.raises(ConfigError) as raised:
        _tensor_specs(config, session(), "1/model.onnx")
    return str(raised.value)


def test_matching_tensors_load() -> None:
    inputs, outputs = _tensor_specs(parse(TENSORS), session(), "1/model.onnx")
    assert (inputs, outputs) == ((TensorSpec("features", "FP32", (-1, 64)),), (TensorSpec("score", "FP32", (-1, 1)),))


BATCH_FIRST = "(the batch dimension first, as max_batch_size > 0)"
MISMATCHES = [
    (
        "dims: [ 64 ]",
        "dims: [ 32 ]",
        f"ranker/config.pbtxt:6: input[0]: 'features' has shape [-1, 32] in the config {BATCH_FIRST}, "
        "but 1/model.onnx expects [-1, 64] (-1 = any size)",
    ),
    (
        "dims: [ 64 ]",
        "dims: [ 64, 1 ]",
        f"ranker/config.pbtxt:6: input[0]: 'features' has shape [-1, 64, 1] in the config {BATCH_FIRST}, "
        "but 1/model.onnx expects [-1, 64] (-1 = any size)",
    ),
    (
        "data_type: TYPE_FP32\n",
        "data_type: TYPE_FP64\n",
        "ranker/config.pbtxt:5: input[0]: 'features' is FP64 in the config, but 1/model.onnx expects FP32",
    ),
    (
        'name: "features"',
        'name: "feature"',
        "ranker/config.pbtxt:4: input[0]: the model has no input 'feature'; 1/model.onnx has 'features' FP32 [-1, 64]",
    ),
    (
        'name: "score" data_type: TYPE_FP32',
        'name: "score" data_type: TYPE_INT64',
        "ranker/config.pbtxt:9: output[0]: 'score' is INT64 in the config, but 1/model.onnx expects FP32",
    ),
    (
        "max_batch_size: 8",
        "max_batch_size: 0",
        "ranker/config.pbtxt:6: input[0]: 'features' has shape [64] in the config, "
        "but 1/model.onnx expects [-1, 64] (-1 = any size)",
    ),
]


@pytest.mark.parametrize(("old", "new", "message"), MISMATCHES)
def test_tensors_at_odds_with_the_model_fail_its_load(old: str, new: str, message: str) -> None:
    assert mismatch(old, new) == message


def test_every_model_input_must_be_listed() -> None:
    config = parse('max_batch_size: 8\ninput [ { name: "a" data_type: TYPE_INT64 dims: [ 4 ] } ]\n')
    add = ort.InferenceSession(modelgen.int64_add_model(), providers=["CPUExecutionProvider"])
    with pytest.raises(ConfigError) as raised:
        _tensor_specs(config, add, "1/model.onnx")
    assert str(raised.value) == (
        "ranker/config.pbtxt:2: input: leaves out the model's inputs ['b']; "
        "1/model.onnx has 'a' INT64 [-1, 4], 'b' INT64 [-1, 4]"
    )


def test_batching_needs_a_variable_first_dimension() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    fixed = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ConfigError) as raised:
        _tensor_specs(parse("\nmax_batch_size: 8\n"), fixed, "1/model.onnx")
    assert str(raised.value) == (
        "ranker/config.pbtxt:2: max_batch_size: 8 needs a variable first (batch) dimension on every input and "
        "output; 1/model.onnx has {'x': [2, 4], 'y': [2, 4]} (-1 = any size): "
        "set max_batch_size 0 and give whole shapes"
    )
    whole = parse('input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 4 ] } ]\n')
    assert _tensor_specs(whole, fixed, "1/model.onnx")[0] == (TensorSpec("x", "FP32", (2, 4)),)
