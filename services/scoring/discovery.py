"""What the model repository holds on disk, and which of it a model's version policy serves.

<root>/<model>/<version>/model.onnx plus <root>/<model>/config.json or Triton's
<root>/<model>/config.pbtxt. Nothing here loads a model: the reconciler compares what is
found here with what serves.

Which config a model has (read_model_config), first found wins:
1. the `config` a RepositoryModelLoad request sends (JSON), until the next load request;
2. config.json: this server's own format, which says more than Triton's (execution
   providers, warmup data, cache TTL, provenance), so one written beside a config.pbtxt is
   taken as meant for this server; the config.pbtxt is then reported as ignored;
3. config.pbtxt (pbtxt.py);
4. none: the model file says everything (names, types, shapes), no batching.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

from services.runtime.logs import get_logger
from services.scoring.config import (
    CONFIG_FILE,
    MODEL_FILE,
    PBTXT_FILE,
    ConfigError,
    ConfigSource,
    ModelConfig,
    VersionPolicy,
    read_config,
)
from services.scoring.pbtxt import read_pbtxt

log = get_logger(__name__)

# What a version was loaded from: its file's (mtime_ns, size) and a digest of its config's text.
# A rewritten file or a changed config gives a new fingerprint, which reloads the version.
Fingerprint = tuple[object, ...]


class RepositoryRoot:
    """The repository's root directory; remembers why it was last unreadable."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.error = ""  # non-empty while the root is unreadable

    def model_names(self) -> list[str]:
        """Every model directory; [] (and `error` set) when the root cannot be read."""
        try:
            children = sorted(self.path.iterdir())
        except OSError as error:
            message = f"model repository {self.path} is unreadable: {error}"
            if self.error != message:
                log.error(
                    "model repository unreadable; models already loaded keep serving",
                    path=str(self.path),
                    error=str(error),
                )
            self.error = message
            return []
        self.error = ""
        return [c.name for c in children if c.is_dir() and not c.name.startswith(".")]


def versions_on_disk(directory: Path) -> dict[int, tuple[int, int]]:
    """{version: (mtime_ns, size)} for every <n>/model.onnx; a rewrite changes the stamp."""
    found = {}
    try:
        children = list(directory.iterdir())
    except OSError:
        return {}
    for child in children:
        if not child.name.isdigit() or int(child.name) < 1:
            continue
        try:
            stat = (child / MODEL_FILE).stat()
        except OSError:
            continue
        found[int(child.name)] = (stat.st_mtime_ns, stat.st_size)
    return found


# How a load request's config override is named in messages.
OVERRIDE_SOURCE = "the load request's config"


def read_model_config(directory: Path, override: str | None) -> tuple[ModelConfig, str]:
    """The model's config (see the order above) and a digest of what it was read from;
    ConfigError, naming the file, when it is unreadable or wrong."""
    json_path, pbtxt_path = directory / CONFIG_FILE, directory / PBTXT_FILE
    if override is not None:
        config = _read_json(directory, override, OVERRIDE_SOURCE)
        return config, _digest(OVERRIDE_SOURCE, override)
    if json_path.is_file() or not pbtxt_path.is_file():
        text = _read_text(json_path) if json_path.is_file() else "{}"
        config = _read_json(directory, text, f"{directory.name}/{CONFIG_FILE}" if json_path.is_file() else "")
        if pbtxt_path.is_file():
            ignored = f"{directory.name}/{PBTXT_FILE} ignored: {CONFIG_FILE} takes precedence over it"
            config = dataclasses.replace(config, warnings=(*config.warnings, ignored))
        return config, _digest(CONFIG_FILE, text)
    text = _read_text(pbtxt_path)
    return read_pbtxt(directory, text), _digest(PBTXT_FILE, text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path.parent.name}/{path.name}: unreadable: {error}") from None


def _read_json(directory: Path, text: str, source: str) -> ModelConfig:
    try:
        config = read_config(directory, text)
    except ConfigError as error:
        raise ConfigError(f"{source or CONFIG_FILE}: {error}") from None
    return dataclasses.replace(config, source=ConfigSource(source))


def _digest(source: str, text: str) -> str:
    """Changes when the text or the file it came from changes (either reloads the model)."""
    return hashlib.blake2b(f"{source}\0{text}".encode(), digest_size=8).hexdigest()


def version_fingerprints(directory: Path, config_digest: str) -> dict[int, Fingerprint]:
    return {v: (stamp, config_digest) for v, stamp in versions_on_disk(directory).items()}


def plan_versions(
    policy: VersionPolicy,
    on_disk: Mapping[int, Fingerprint],
    serving: Mapping[int, Fingerprint],
    failed: Mapping[int, Fingerprint],
) -> tuple[list[int], list[int]]:
    """(wanted, stale): the versions the policy serves, and those of them to (re)load now.

    `serving` and `failed` map versions to the fingerprint they were loaded (or failed) from.
    A version whose current file already failed is skipped, so the policy falls back to older
    ones; one still serving from an earlier good file stays wanted and keeps serving.
    """

    def failed_as_is(v: int) -> bool:
        return failed.get(v) == on_disk[v]

    wanted = policy.select([v for v in on_disk if v in serving or not failed_as_is(v)])
    stale = [v for v in wanted if not failed_as_is(v) and serving.get(v) != on_disk[v]]
    return wanted, stale
