"""Per-model configuration: <repository>/<model>/config.json, Triton-like.

A model directory may hold Triton's own config.pbtxt instead (pbtxt.py maps it onto the same
ModelConfig); when it holds both, config.json wins and the config.pbtxt is reported as
ignored (discovery.read_model_config).

Every key is optional; what the model file says (input/output names, types, shapes) fills
the gaps, and what config.json says about tensors is checked against the model on load.
Unknown keys are rejected so a typo (``max_batch_sise``) fails loudly instead of silently
doing nothing.

Example::

    {
      "max_batch_size": 4096,
      "inputs":  [{"name": "features", "datatype": "FP32", "shape": [-1, 64]}],
      "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 1]}],
      "dynamic_batching": {"max_queue_delay_microseconds": 500,
                           "preferred_batch_size": [256, 1024], "max_queue_size": 1024,
                           "priority_levels": 2, "default_priority_level": 2},
      "instance_count": 1,
      "execution_providers": ["tensorrt", "cuda", "cpu"],
      "version_policy": {"latest": {"num_versions": 1}},
      "warmup": [{"batch_size": 1}, {"batch_size": 256, "data": "random"}],
      "response_cache": {"enable": true, "ttl_seconds": 60}
    }
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.runtime.limits import echo
from services.scoring.tensors import DATATYPES

CONFIG_FILE = "config.json"
# Triton's model configuration (protobuf text format); config.json wins over it.
PBTXT_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
# The one platform (Triton's name) and backend this server runs; a config may name either.
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
# <model>/<version>/provenance.json: where that version came from (overrides config.json's).
PROVENANCE_FILE = "provenance.json"
# A bounded queue by default: overload answers RESOURCE_EXHAUSTED instead of growing memory.
DEFAULT_MAX_QUEUE_SIZE = 1024
PROVIDER_NAMES = ("auto", "tensorrt", "cuda", "cpu")
WARMUP_DATA = ("zero", "random")


class ConfigError(ValueError):
    """config.json is unreadable or says something impossible; the message names the key."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # full shape, batch dimension included; -1 = any size
    # Where the config states it ("input[0]"); "" when it comes from the model file.
    field: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class ConfigSource:
    """The file a model's config was read from, and the line of each field where known
    (config.pbtxt), so that a check failing at load names the file, line and field."""

    file: str = ""  # e.g. "ranker/config.pbtxt"; "" for the built-in defaults
    lines: Mapping[str, int] = field(default_factory=dict)  # "input[0].dims" -> line

    def where(self, path: str, detail: str = "") -> str:
        """'<file>:<line>: <path>': the line of `path`.`detail` if known, else of `path`
        or the nearest enclosing field."""
        probe = f"{path}.{detail}" if detail else path
        while probe:
            line = self.lines.get(probe)
            if line:
                return f"{self.file}:{line}: {path}"
            probe = probe.rpartition(".")[0]
        return f"{self.file}: {path}" if self.file else f"config {path}"


@dataclass(frozen=True)
class BatchingPolicy:
    """Dynamic batching; max_batch_size 0 means every request runs alone."""

    max_batch_size: int = 0
    max_queue_delay_microseconds: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # 0 = unbounded
    default_timeout_microseconds: int = 0  # 0 = only the caller's gRPC deadline applies
    # Triton's priorities: levels 1 (first) .. priority_levels; 0 = priorities ignored.
    priority_levels: int = 0
    default_priority_level: int = 0  # level of requests that give no priority


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # latest | specific | all
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Sequence[int]) -> list[int]:
        """Which of the versions on disk should be loaded (ascending)."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :]


@dataclass(frozen=True)
class WarmupSpec:
    batch_size: int = 1
    data: str = "zero"


@dataclass(frozen=True)
class CachePolicy:
    enable: bool = False
    ttl_seconds: int = 60


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    instance_count: int = 1
    gpus: tuple[int, ...] = ()
    execution_providers: tuple[str, ...] = ()  # empty: the server's SCORING_PROVIDERS
    intra_op_threads: int = 0  # 0: the server's SCORING_INTRA_OP_THREADS
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    warmup: tuple[WarmupSpec, ...] = (WarmupSpec(),)
    cache: CachePolicy = field(default_factory=CachePolicy)
    # Defaults for every version's provenance (owner, training_data_digest, source_revision,
    # any other string keys), strings only.
    provenance: Mapping[str, str] = field(default_factory=dict)
    source: ConfigSource = field(default_factory=ConfigSource)
    # What the file says that this server does not do (each field named, with its line),
    # or a config file it did not read: logged at load and shown in RepositoryIndex.
    warnings: tuple[str, ...] = ()

    def warning_text(self) -> str:
        """The warnings as one line ("" when none), for the log and RepositoryIndex."""
        return "; ".join(self.warnings)


def runtime_error(platform: str = "", backend: str = "") -> str:
    """Why a config's platform/backend cannot run here ("" when it can: ONNX Runtime)."""
    if platform not in ("", PLATFORM):
        return f"platform {echo(platform)} is not supported: this server runs ONNX models (platform {PLATFORM!r})"
    if backend not in ("", BACKEND):
        return f"backend {echo(backend)} is not supported: this server runs ONNX models (backend {BACKEND!r})"
    return ""


_TOP_KEYS = {
    "name",
    "platform",
    "backend",
    "inputs",
    "outputs",
    "input",
    "output",
    "max_batch_size",
    "dynamic_batching",
    "instance_count",
    "instance_group",
    "execution_providers",
    "intra_op_threads",
    "version_policy",
    "warmup",
    "response_cache",
    "provenance",
}


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _mapping(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be an object, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(allowed)}")
    return value


def _tensors(value: Any, where: str, batched: bool) -> tuple[TensorSpec, ...]:
    """`shape` is the whole shape; Triton's `dims` leave out the batch dimension when the model
    batches (max_batch_size > 0), so a config copied from Triton means the same here."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of tensors")
    specs = []
    for index, item in enumerate(value):
        item = _mapping(item, f"{where}[{index}]", {"name", "datatype", "data_type", "shape", "dims"})
        datatype = str(item.get("datatype", item.get("data_type", ""))).removeprefix("TYPE_")
        datatype = {"STRING": "BYTES"}.get(datatype, datatype)
        if datatype not in DATATYPES:
            raise ConfigError(f"{where}[{index}].datatype {datatype!r} is not one of {sorted(DATATYPES)}")
        if "shape" in item and "dims" in item:
            raise ConfigError(f"{where}[{index}] has both shape and dims; give one (dims: without the batch dimension)")
        key = "shape" if "shape" in item else "dims"
        shape = item.get(key)
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < -1 for d in shape):
            raise ConfigError(f"{where}[{index}].{key} must be a list of integers (-1 = any), got {shape!r}")
        if key == "dims" and batched:
            shape = [-1, *shape]
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{where}[{index}] needs a name")
        specs.append(TensorSpec(item["name"], datatype, tuple(shape), field=f"{where}[{index}]"))
    return tuple(specs)


def _batching(doc: Mapping[str, Any], max_batch_size: int) -> BatchingPolicy:
    raw = doc.get("dynamic_batching", {})
    if raw is None or raw is False or max_batch_size == 0:
        # Batching off: requests still queue (bounded) but each runs alone.
        return BatchingPolicy(max_batch_size=0)
    raw = _mapping(
        raw,
        "dynamic_batching",
        {
            "max_queue_delay_microseconds",
            "preferred_batch_size",
            "max_queue_size",
            "default_timeout_microseconds",
            "priority_levels",
            "default_priority_level",
        },
    )
    preferred = raw.get("preferred_batch_size", [])
    if not isinstance(preferred, list):
        raise ConfigError("dynamic_batching.preferred_batch_size must be a list of integers")
    sizes = tuple(sorted({_int(p, "dynamic_batching.preferred_batch_size[]", 1) for p in preferred}))
    if sizes and sizes[-1] > max_batch_size:
        raise ConfigError(f"preferred batch size {sizes[-1]} exceeds max_batch_size {max_batch_size}")
    levels = _int(raw.get("priority_levels", 0), "dynamic_batching.priority_levels")
    default_level = _int(raw.get("default_priority_level", levels), "dynamic_batching.default_priority_level")
    if levels and not 1 <= default_level <= levels:
        raise ConfigError(f"default_priority_level must be within 1..priority_levels ({levels})")
    return BatchingPolicy(
        max_batch_size=max_batch_size,
        max_queue_delay_microseconds=_int(raw.get("max_queue_delay_microseconds", 0), "max_queue_delay_microseconds"),
        preferred_batch_sizes=sizes,
        max_queue_size=_int(raw.get("max_queue_size", DEFAULT_MAX_QUEUE_SIZE), "max_queue_size"),
        default_timeout_microseconds=_int(raw.get("default_timeout_microseconds", 0), "default_timeout_microseconds"),
        priority_levels=levels,
        default_priority_level=default_level if levels else 0,
    )


def _version_policy(raw: Any) -> VersionPolicy:
    if raw is None:
        return VersionPolicy()
    raw = _mapping(raw, "version_policy", {"latest", "specific", "all"})
    if len(raw) != 1:
        raise ConfigError("version_policy takes exactly one of latest / specific / all")
    ((kind, body),) = raw.items()
    if kind == "latest":
        body = _mapping(body, "version_policy.latest", {"num_versions"})
        return VersionPolicy("latest", num_versions=_int(body.get("num_versions", 1), "num_versions", 1))
    if kind == "specific":
        body = _mapping(body, "version_policy.specific", {"versions"})
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions:
            raise ConfigError("version_policy.specific.versions must be a non-empty list")
        return VersionPolicy("specific", versions=tuple(_int(v, "versions[]", 1) for v in versions))
    _mapping(body, "version_policy.all", set())
    return VersionPolicy("all")


def _instances(doc: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    if "instance_group" in doc:
        groups = doc["instance_group"]
        if not isinstance(groups, list) or len(groups) != 1:
            raise ConfigError('instance_group: one group is supported, e.g. [{"count": 2, "gpus": [0, 1]}]')
        group = _mapping(groups[0], "instance_group[0]", {"count", "kind", "gpus"})
        gpus = group.get("gpus", [])
        if not isinstance(gpus, list):
            raise ConfigError("instance_group[0].gpus must be a list of device ids")
        return _int(group.get("count", 1), "instance_group[0].count", 1), tuple(_int(g, "gpus[]") for g in gpus)
    return _int(doc.get("instance_count", 1), "instance_count", 1), ()


def _providers(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or any(p not in PROVIDER_NAMES for p in raw):
        raise ConfigError(f"execution_providers must be a list drawn from {list(PROVIDER_NAMES)}, got {raw!r}")
    return tuple(raw)


def _warmup(raw: Any) -> tuple[WarmupSpec, ...]:
    if raw is None:
        return (WarmupSpec(),)
    if not isinstance(raw, list):
        raise ConfigError("warmup must be a list of {batch_size, data}")
    specs = []
    for index, item in enumerate(raw):
        item = _mapping(item, f"warmup[{index}]", {"batch_size", "data"})
        data = item.get("data", "zero")
        if data not in WARMUP_DATA:
            raise ConfigError(f"warmup[{index}].data must be one of {list(WARMUP_DATA)}")
        specs.append(WarmupSpec(_int(item.get("batch_size", 1), f"warmup[{index}].batch_size", 1), data))
    return tuple(specs)


def _cache(raw: Any) -> CachePolicy:
    if raw is None:
        return CachePolicy()
    raw = _mapping(raw, "response_cache", {"enable", "ttl_seconds"})
    enable = raw.get("enable", False)
    if not isinstance(enable, bool):
        raise ConfigError("response_cache.enable must be true or false")
    return CachePolicy(enable, _int(raw.get("ttl_seconds", 60), "response_cache.ttl_seconds", 1))


def parse_config(name: str, doc: Mapping[str, Any]) -> ModelConfig:
    """Validate one model's config document (already parsed JSON)."""
    doc = _mapping(doc, "config", _TOP_KEYS)
    if doc.get("name", name) != name:
        raise ConfigError(f"config names model {doc['name']!r} but lives in directory {name!r}")
    unsupported = runtime_error(str(doc.get("platform", "")), str(doc.get("backend", "")))
    if unsupported:
        raise ConfigError(unsupported)
    max_batch_size = _int(doc.get("max_batch_size", 0), "max_batch_size")
    count, gpus = _instances(doc)
    warmup = _warmup(doc.get("warmup"))
    too_big = [w.batch_size for w in warmup if max_batch_size and w.batch_size > max_batch_size]
    if too_big:
        raise ConfigError(f"warmup batch sizes {too_big} exceed max_batch_size {max_batch_size}")
    return ModelConfig(
        name=name,
        inputs=_tensors(*_tensor_key(doc, "inputs", "input"), max_batch_size > 0),
        outputs=_tensors(*_tensor_key(doc, "outputs", "output"), max_batch_size > 0),
        batching=_batching(doc, max_batch_size),
        instance_count=count,
        gpus=gpus,
        execution_providers=_providers(doc.get("execution_providers")),
        intra_op_threads=_int(doc.get("intra_op_threads", 0), "intra_op_threads"),
        version_policy=_version_policy(doc.get("version_policy")),
        warmup=warmup,
        cache=_cache(doc.get("response_cache")),
        provenance=parse_provenance(doc.get("provenance", {}), "provenance"),
    )


def _tensor_key(doc: Mapping[str, Any], ours: str, tritons: str) -> tuple[Any, str]:
    """The tensor list and the key it is under (our `inputs` or Triton's `input`)."""
    key = ours if ours in doc or tritons not in doc else tritons
    return doc.get(key, []), key


def parse_provenance(doc: Any, where: str) -> dict[str, str]:
    """A flat object of strings (numbers are written as text; nested values as JSON)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where} must be an object of strings, got {type(doc).__name__}")
    found = {}
    for key, value in doc.items():
        if value is None:
            continue
        if isinstance(value, str):
            found[str(key)] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[str(key)] = str(value)
        else:
            found[str(key)] = json.dumps(value, sort_keys=True)
    return found


def read_provenance(version_dir: Path, defaults: Mapping[str, str]) -> dict[str, str]:
    """A version's provenance: config.json's `provenance`, then its own provenance.json."""
    path = version_dir / PROVENANCE_FILE
    if not path.is_file():
        return dict(defaults)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not readable JSON: {error}") from None
    return {**defaults, **parse_provenance(doc, str(path))}


def read_config(model_dir: Path, override: str | None = None) -> ModelConfig:
    """config.json of a model directory (or an override JSON text, as RepositoryModelLoad sends)."""
    text = override
    if text is None:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return parse_config(model_dir.name, {})
        text = path.read_text()
    try:
        doc = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{CONFIG_FILE} is not valid JSON: {error}") from None
    return parse_config(model_dir.name, doc)
