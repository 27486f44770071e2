"""What the model repository holds on disk, and which of it a model's version policy serves.

<root>/<model>/<version>/model.onnx plus <root>/<model>/config.json. Nothing here loads a
model: the reconciler compares what is found here with what serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from services.runtime.logs import get_logger
from services.scoring.config import CONFIG_FILE, MODEL_FILE, ConfigError, ModelConfig, VersionPolicy, read_config

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
                log.error("model repository unreadable; models already loaded keep serving", path=str(self.path), error=str(error))
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


def read_model_config(directory: Path, override: str | None) -> tuple[ModelConfig, str]:
    """The model's config (a load request's override, else config.json, else defaults) and a
    digest of its text; ConfigError, naming the file, when it is unreadable or wrong."""
    config_path = directory / CONFIG_FILE
    try:
        text = override if override is not None else (config_path.read_text() if config_path.is_file() else "{}")
        config = read_config(directory, text)
    except (OSError, ConfigError) as error:
        raise ConfigError(f"{CONFIG_FILE}: {error}") from None
    return config, hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


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
