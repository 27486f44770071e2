"""config.pbtxt: a Triton model configuration, read as it is, as this server's ModelConfig.

The file is parsed with google.protobuf.text_format against Triton's own model_config.proto
(vendored in third_party/triton-common, compiled into services.genproto), so anything that is
not protobuf text of Triton's ModelConfig fails with text_format's file:line:column and the
field it could not take. What parses is then mapped onto config.ModelConfig, the settings a
config.json gives:

- name (must be the directory's), platform "onnxruntime_onnx" / backend "onnxruntime" (any
  other is a load error), max_batch_size;
- input / output: name, data_type (TYPE_FP32 -> FP32, TYPE_STRING -> BYTES), dims (without
  the batch dimension when max_batch_size > 0), checked against the ONNX model at load;
- dynamic_batching: preferred_batch_size, max_queue_delay_microseconds, priority_levels,
  default_priority_level, default_queue_policy {default_timeout_microseconds, max_queue_size};
- instance_group: count, kind (KIND_CPU -> the CPU provider, KIND_GPU -> CUDA, or TensorRT
  with optimization's gpu_execution_accelerator "tensorrt"; KIND_AUTO/KIND_MODEL -> the
  server's SCORING_PROVIDERS), gpus;
- version_policy: latest {num_versions}, all, specific {versions};
- model_warmup: batch_size, zero_data / random_data; response_cache.enable;
  parameters "intra_op_thread_count" (the ONNX Runtime backend's).

Every other field the file sets is reported by name (with its line) as not supported:
logged at load and shown in RepositoryIndex, never silently dropped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.genproto.inference import model_config_pb2 as mc
from services.runtime.limits import echo
from services.scoring.config import (
    DEFAULT_MAX_QUEUE_SIZE,
    MODEL_FILE,
    PBTXT_FILE,
    BatchingPolicy,
    CachePolicy,
    ConfigError,
    ConfigSource,
    ModelConfig,
    TensorSpec,
    VersionPolicy,
    WarmupSpec,
    runtime_error,
)
from services.scoring.tensors import BYTES, DATATYPES

# A text_format message quotes the offending line; operators read it in RepositoryIndex.
_MAX_MESSAGE_CHARS = 300

# Fields this server acts on, as paths: [] is any index of a repeated field, [*] any key of
# a map; a map key in quotes is that key only. Every other field set in a file is reported.
SUPPORTED_FIELDS = frozenset(
    {
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "default_model_filename",
        *(f"{tensor}[].{key}" for tensor in ("input", "output") for key in ("name", "data_type", "dims")),
        "version_policy.latest.num_versions",
        "version_policy.all",
        "version_policy.specific.versions",
        *(
            f"dynamic_batching.{key}"
            for key in (
                "preferred_batch_size",
                "max_queue_delay_microseconds",
                "priority_levels",
                "default_priority_level",
                "default_queue_policy.default_timeout_microseconds",
                "default_queue_policy.max_queue_size",
            )
        ),
        *(f"instance_group[].{key}" for key in ("name", "count", "kind", "gpus")),
        "optimization.execution_accelerators.gpu_execution_accelerator[].name",
        "model_warmup[].name",
        "model_warmup[].batch_size",
        "model_warmup[].inputs[*].zero_data",
        "model_warmup[].inputs[*].random_data",
        'parameters["intra_op_thread_count"].string_value',
        "response_cache.enable",
    }
)
# Supported fields that take only some values; another value is reported like a field.
SUPPORTED_VALUES = {
    "default_model_filename": {MODEL_FILE},
    "optimization.execution_accelerators.gpu_execution_accelerator[].name": {"tensorrt"},
}
INTRA_OP_PARAMETER = "intra_op_thread_count"
TENSORRT_ACCELERATOR = "tensorrt"


def _pattern(path: str) -> re.Pattern[str]:
    escaped = re.escape(path).replace(r"\[\]", r"\[\d+\]").replace(r"\[\*\]", r'\["[^"]*"\]')
    return re.compile(escaped)


def _enclosing(path: str) -> Iterator[str]:
    """The fields that hold `path`: a[].b.c -> a, a[], a[].b."""
    parts = path.split(".")
    for end in range(1, len(parts)):
        holder = ".".join(parts[:end])
        yield holder
        if holder.endswith("]"):
            yield holder[: holder.rindex("[")]  # the repeated field or map itself


_SUPPORTED = [(_pattern(path), SUPPORTED_VALUES.get(path)) for path in sorted(SUPPORTED_FIELDS)]
_HOLDERS = [_pattern(holder) for holder in sorted({h for path in SUPPORTED_FIELDS for h in _enclosing(path)})]
YES, HOLDER, NO, OTHER_VALUE = "yes", "holder", "no", "other value"


def _support(path: str, value: object) -> str:
    """YES (field and value supported), HOLDER (a message holding supported fields), NO, or
    OTHER_VALUE (a supported field, but not with this value)."""
    for pattern, values in _SUPPORTED:
        if pattern.fullmatch(path):
            return YES if values is None or value in values else OTHER_VALUE
    return HOLDER if any(pattern.fullmatch(path) for pattern in _HOLDERS) else NO


# ---------------------------------------------------------------------------- reading


def read_pbtxt(model_dir: Path, text: str) -> ModelConfig:
    """The ModelConfig a model directory's config.pbtxt (`text`) says; ConfigError naming the
    file, line and field when it is not Triton's ModelConfig or asks for what cannot run here."""
    source_file = f"{model_dir.name}/{PBTXT_FILE}"
    try:
        proto = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as error:
        raise ConfigError(f"{source_file}:{_bounded(str(error))}") from None
    source = ConfigSource(source_file, field_lines(text, mc.ModelConfig.DESCRIPTOR))
    return _Mapping(model_dir.name, proto, source).config()


def _bounded(message: str) -> str:
    # text_format says "3:7 : problem"; the file's name goes in front.
    message = re.sub(r"^(\d+:\d+) : ", r"\1: ", message)
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS] + "..."


def unsupported_fields(message: Message, prefix: str = "") -> list[tuple[str, str]]:
    """(path, as reported) of each field set in `message` that this server does not act on,
    outermost only: `optimization.cuda`, not each field inside it."""
    found: list[tuple[str, str]] = []
    for descriptor, value in message.ListFields():
        field_path = prefix + descriptor.name
        if _repeated(descriptor) and _support(field_path, None) == NO:
            found.append((field_path, field_path))  # the whole list or map: named once
            continue
        for path, item in _items(field_path, descriptor, value):
            support = _support(path, item)
            if support == NO:
                found.append((path, path))
            elif support == OTHER_VALUE:
                found.append((path, f"{path} {_text(item)}"))
            elif isinstance(item, Message):
                found += unsupported_fields(item, path + ".")
    return found


def _items(path: str, descriptor: FieldDescriptor, value: Any) -> Iterator[tuple[str, object]]:
    """A field's values with their paths: name[i] for repeated fields, name["key"] for maps."""
    if _is_map(descriptor):
        for key in sorted(value):
            yield f'{path}["{key}"]', value[key]
    elif _repeated(descriptor) and descriptor.message_type is not None:
        for index, item in enumerate(value):
            yield f"{path}[{index}]", item
    elif _repeated(descriptor):
        yield path, list(value)
    else:
        yield path, value


def _repeated(descriptor: FieldDescriptor) -> bool:
    """Repeated (maps too). protobuf >= 6.31 has is_repeated and deprecates label."""
    flag = getattr(descriptor, "is_repeated", None)
    if flag is None or callable(flag):
        return bool(flag()) if callable(flag) else descriptor.label == FieldDescriptor.LABEL_REPEATED
    return bool(flag)


def _is_map(descriptor: FieldDescriptor) -> bool:
    return descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry


def _text(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------- lines


@dataclass(frozen=True)
class _Token:
    text: str
    line: int


_TOKENS = re.compile(
    r"""(?P<skip>[ \t\r\f\v]+|\#[^\n]*)
      | (?P<newline>\n)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<punct>[{}\[\]<>:,;])
      | (?P<word>[^\s{}\[\]<>:,;"'\#]+)""",
    re.X,
)


def _tokenize(text: str) -> list[_Token]:
    tokens, line = [], 1
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "newline":
            line += 1
        elif kind != "skip":
            tokens.append(_Token(match.group(), line))
    return tokens


def field_lines(text: str, descriptor: Any) -> dict[str, int]:
    """The line each field of a text-format message starts on, by the paths unsupported_fields
    uses (input[1].dims, parameters["key"].string_value). For text that already parsed."""
    walker = _LineWalker(_tokenize(text))
    walker.message(descriptor, "", closing="")
    return walker.lines


class _LineWalker:
    """Follows text format's grammar (fields, nested messages, [lists]) with the descriptor,
    which says which fields repeat, so that occurrences get their index as in the message."""

    def __init__(self, tokens: Sequence[_Token]) -> None:
        self.tokens = tokens
        self.at = 0
        self.lines: dict[str, int] = {}
        self.values: dict[str, str] = {}  # a scalar field's first token, as written

    def _peek(self) -> str:
        return self.tokens[self.at].text if self.at < len(self.tokens) else ""

    def _take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def message(self, descriptor: Descriptor | None, prefix: str, closing: str) -> None:
        seen: Counter[str] = Counter()
        while self.at < len(self.tokens) and self._peek() != closing:
            if self._peek() in (",", ";"):
                self._take()
                continue
            name = self._take()
            field = descriptor.fields_by_name.get(name.text) if descriptor is not None else None
            self.lines.setdefault(prefix + name.text, name.line)
            if self._peek() == ":":
                self._take()
            if self._peek() == "[":
                self._take()
                while self._peek() not in ("]", ""):
                    if self._peek() == ",":
                        self._take()
                        continue
                    self._value(field, prefix + name.text, seen, self.tokens[self.at].line)
                self._take()
            else:
                self._value(field, prefix + name.text, seen, name.line)

    def _value(self, field: FieldDescriptor | None, path: str, seen: Counter[str], line: int) -> None:
        repeated = field is not None and _repeated(field)
        indexed = f"{path}[{seen[path]}]" if repeated else path
        seen[path] += 1
        opening = self._take()
        if opening.text not in ("{", "<"):
            self.lines.setdefault(indexed, line)
            self.values.setdefault(indexed, opening.text)
            while self._peek()[:1] in ('"', "'"):  # adjacent strings are one value
                self._take()
            return
        closing = "}" if opening.text == "{" else ">"
        message_type = field.message_type if field is not None else None
        if field is not None and _is_map(field):
            self._map_entry(message_type, path, line, closing)
        else:
            self.lines.setdefault(indexed, line)
            self.message(message_type, indexed + ".", closing)
            self._take()

    def _map_entry(self, entry: Descriptor | None, path: str, line: int, closing: str) -> None:
        """A map entry ({key: "k" value ...}) goes by its key: path["k"]."""
        inner = _LineWalker(self.tokens)
        inner.at = self.at
        inner.message(entry, "", closing)
        key = inner.values.get("key", "")
        if key[:1] in ('"', "'"):
            key = key[1:-1]  # a string key's literal, unquoted
        entry_path = f'{path}["{key}"]'
        self.lines.setdefault(entry_path, line)
        for inner_path, inner_line in inner.lines.items():
            if inner_path.startswith("value"):
                self.lines.setdefault(entry_path + inner_path.removeprefix("value"), inner_line)
        self.at = inner.at
        self._take()


# ---------------------------------------------------------------------------- mapping


# Triton's DataType names -> the Open Inference Protocol's (TYPE_STRING is BYTES).
DATATYPE_OF_TRITON = {
    **{mc.DataType.Value(f"TYPE_{name}"): name for name in DATATYPES if name != BYTES},
    mc.TYPE_STRING: BYTES,
}
_CPU, _GPU, _AUTO = "cpu", "gpu", "auto"


class _Mapping:
    """One parsed config.pbtxt onto ModelConfig; each refusal names file, line and field."""

    def __init__(self, name: str, proto: mc.ModelConfig, source: ConfigSource) -> None:
        self.name = name
        self.proto = proto
        self.source = source
        self.batched = proto.max_batch_size > 0

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source.where(path)}: {problem}")

    def config(self) -> ModelConfig:
        proto = self.proto
        if proto.name and proto.name != self.name:
            raise self.fail("name", f"names model {echo(proto.name)}, but the directory is {self.name!r}")
        for path in ("platform", "backend"):
            unsupported = runtime_error(**{path: getattr(proto, path)})
            if unsupported:
                raise self.fail(path, unsupported)
        if proto.max_batch_size < 0:
            raise self.fail("max_batch_size", f"must be >= 0, got {proto.max_batch_size}")
        count, gpus, providers = self._instances()
        return ModelConfig(
            name=self.name,
            inputs=self._tensors("input", proto.input),
            outputs=self._tensors("output", proto.output),
            batching=self._batching(),
            instance_count=count,
            gpus=gpus,
            execution_providers=providers,
            intra_op_threads=self._intra_op_threads(),
            version_policy=self._version_policy(),
            warmup=self._warmup(),
            cache=CachePolicy(enable=proto.response_cache.enable),
            source=self.source,
            warnings=self._warnings(),
        )

    def _warnings(self) -> tuple[str, ...]:
        notes = [f"{label} (line {self._line(path)})" for path, label in unsupported_fields(self.proto)]
        if self.proto.HasField("dynamic_batching") and not self.batched:
            notes.append(f"dynamic_batching (line {self._line('dynamic_batching')}) with max_batch_size 0")
        return (f"{self.source.file}: not supported, ignored: {', '.join(notes)}",) if notes else ()

    def _line(self, path: str) -> int | str:
        return self.source.lines.get(path, "?")

    def _tensors(self, kind: str, tensors: Iterable[mc.ModelInput | mc.ModelOutput]) -> tuple[TensorSpec, ...]:
        specs = []
        for index, tensor in enumerate(tensors):
            path = f"{kind}[{index}]"
            if not tensor.name:
                raise self.fail(path, "needs a name")
            datatype = DATATYPE_OF_TRITON.get(tensor.data_type)
            if datatype is None:
                named = mc.DataType.Name(tensor.data_type)
                supported = ", ".join(sorted(mc.DataType.Name(t) for t in DATATYPE_OF_TRITON))
                raise self.fail(f"{path}.data_type", f"{named} is not supported; use one of {supported}")
            if any(d < -1 for d in tensor.dims):
                raise self.fail(f"{path}.dims", f"{list(tensor.dims)}: each must be >= 0, or -1 for any size")
            shape = (-1, *tensor.dims) if self.batched else tuple(tensor.dims)
            specs.append(TensorSpec(tensor.name, datatype, shape, field=path))
        return tuple(specs)

    def _batching(self) -> BatchingPolicy:
        if not self.batched:
            return BatchingPolicy(max_batch_size=0)
        # Without dynamic_batching the batcher still runs (no delay), as for config.json.
        raw = self.proto.dynamic_batching
        sizes = tuple(sorted(set(raw.preferred_batch_size)))
        largest = self.proto.max_batch_size
        if sizes and (sizes[0] < 1 or sizes[-1] > largest):
            raise self.fail(
                "dynamic_batching.preferred_batch_size",
                f"{list(raw.preferred_batch_size)}: each must be within 1..{largest} (max_batch_size)",
            )
        levels, default_level = raw.priority_levels, raw.default_priority_level
        if levels and not 1 <= default_level <= levels:
            raise self.fail(
                "dynamic_batching.default_priority_level",
                f"{default_level} must be within 1..priority_levels ({levels})",
            )
        queue = raw.default_queue_policy
        return BatchingPolicy(
            max_batch_size=self.proto.max_batch_size,
            max_queue_delay_microseconds=raw.max_queue_delay_microseconds,
            preferred_batch_sizes=sizes,
            # 0 (or no queue policy) is unbounded in Triton; here the queue stays bounded.
            max_queue_size=queue.max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
            default_timeout_microseconds=queue.default_timeout_microseconds,
            priority_levels=levels,
            default_priority_level=default_level if levels else 0,
        )

    def _instances(self) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
        """(instances, the device of each instance on GPU, execution providers).

        As in Triton, a GPU group's count is per listed GPU (without gpus: GPU 0 here), a CPU
        group's count is its total, and a count of 0 means 1."""
        groups = self.proto.instance_group
        if not groups:
            return 1, (), self._providers(_AUTO)
        kinds, count, devices = set(), 0, []
        for index, group in enumerate(groups):
            kind = self._kind(index, group)
            kinds.add(kind)
            per_device = group.count or 1
            if kind == _GPU:
                for device in group.gpus or [0]:
                    devices += [device] * per_device
                count += per_device * max(len(group.gpus), 1)
            else:
                count += per_device
        if len(kinds) > 1:
            raise self.fail("instance_group", f"mixes kinds {sorted(kinds)}; one kind per model is supported")
        kind = kinds.pop()
        return count, tuple(devices) if kind == _GPU else (), self._providers(kind)

    def _kind(self, index: int, group: mc.ModelInstanceGroup) -> str:
        path = f"instance_group[{index}]"
        if group.kind == mc.ModelInstanceGroup.KIND_CPU:
            if group.gpus:
                raise self.fail(f"{path}.gpus", "KIND_CPU takes no gpus")
            return _CPU
        if group.kind == mc.ModelInstanceGroup.KIND_GPU or group.gpus:
            if any(g < 0 for g in group.gpus):
                raise self.fail(f"{path}.gpus", f"{list(group.gpus)}: GPU ids are >= 0")
            return _GPU
        return _AUTO  # KIND_AUTO, KIND_MODEL: ONNX Runtime places it as SCORING_PROVIDERS says

    def _providers(self, kind: str) -> tuple[str, ...]:
        accelerators = self.proto.optimization.execution_accelerators.gpu_execution_accelerator
        tensorrt = any(a.name == TENSORRT_ACCELERATOR for a in accelerators)
        if kind == _CPU:
            return ("cpu",)
        if tensorrt:
            return ("tensorrt",)  # TensorRT, then CUDA, then CPU (providers.ALIASES)
        return ("cuda",) if kind == _GPU else ()

    def _intra_op_threads(self) -> int:
        parameter = self.proto.parameters.get(INTRA_OP_PARAMETER)
        if parameter is None:
            return 0
        value = parameter.string_value.strip()
        if not value.isdigit():
            raise self.fail(
                f'parameters["{INTRA_OP_PARAMETER}"]', f"{parameter.string_value[:32]!r} must be a whole number >= 0"
            )
        return int(value)

    def _version_policy(self) -> VersionPolicy:
        policy = self.proto.version_policy
        choice = policy.WhichOneof("policy_choice")
        if choice == "latest":
            if policy.latest.num_versions < 1:
                raise self.fail("version_policy.latest.num_versions", "must be >= 1")
            return VersionPolicy("latest", num_versions=policy.latest.num_versions)
        if choice == "specific":
            versions = tuple(policy.specific.versions)
            if not versions or min(versions) < 1:
                raise self.fail("version_policy.specific.versions", f"{list(versions)}: give versions >= 1")
            return VersionPolicy("specific", versions=versions)
        if choice == "all":
            return VersionPolicy("all")
        return VersionPolicy()

    def _warmup(self) -> tuple[WarmupSpec, ...]:
        if not self.proto.model_warmup:
            return (WarmupSpec(),)
        specs = []
        for index, warmup in enumerate(self.proto.model_warmup):
            path = f"model_warmup[{index}].batch_size"
            batch_size = warmup.batch_size
            if batch_size < 1 or (self.batched and batch_size > self.proto.max_batch_size):
                limit = self.proto.max_batch_size if self.batched else 1
                raise self.fail(path, f"{batch_size} must be within 1..{limit}")
            random = any(i.random_data for i in warmup.inputs.values())
            specs.append(WarmupSpec(batch_size, "random" if random else "zero"))
        return tuple(specs)
