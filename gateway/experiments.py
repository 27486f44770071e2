"""Experiments: which model (version) scores a user's request, and which one shadows it.

One file (GATEWAY_EXPERIMENTS_FILE, YAML or JSON) describes at most one experiment::

    name: ranker-v2            # salts the hash: a new name reshuffles users
    arms:                      # percents sum to 100, in steps of 0.01
      - {name: control, model: ranker, version: "1", percent: 90}
      - {name: canary,  model: ranker, version: "2", percent: 10}
    overrides: {u42: canary}   # optional: pin users to arms (QA, demos)
    shadow:                    # optional: a copy of each scoring request, never returned
      model: ranker
      version: "2"
      percent: 100             # of requests copied
      max_in_flight: 8         # shadow calls (batches of copies) at once; then copies wait, then drop
      timeout_seconds: 1.0

A user's arm is stable: bucket = sha1("<name>:<user_id>") mod 10,000, and the arms own
consecutive bucket ranges in the order listed. A canary is an arm with a small percent,
listed last: raising its percent moves users from the arm before it into it, and the users
it already has stay in it.
With no `arms` every request goes to the gateway's model (GATEWAY_MODEL_NAME, newest
version), which lets a file configure shadow traffic alone.

The file is re-read when it changes (checked every GATEWAY_EXPERIMENTS_RELOAD_SECONDS, and
on SIGHUP). A file that does not parse or validate is logged and counted, and the previous
configuration keeps serving.
An empty file is taken for one caught between truncation and write and is not applied:
`{}` turns experiments off.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from services.runtime.logs import get_logger

log = get_logger(__name__)

BUCKETS = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ExperimentsError(ValueError):
    """The experiments file is unreadable or says something impossible; names the key."""


@dataclass(frozen=True)
class Arm:
    name: str
    model: str
    version: str  # "" = the newest ready version
    percent: float
    upper: int  # exclusive upper bucket of this arm's range


@dataclass(frozen=True)
class Shadow:
    model: str
    version: str
    percent: float = 100.0
    max_in_flight: int = 8
    timeout_seconds: float = 1.0


@dataclass(frozen=True)
class Assignment:
    """Who scores this request: the arm's model, and the arm's name for the response and metrics."""

    experiment: str
    arm: str
    model: str
    version: str


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = ""
    arms: tuple[Arm, ...] = ()
    overrides: Mapping[str, str] = field(default_factory=dict)
    shadow: Shadow | None = None

    def assign(self, user_id: str, default_model: str) -> Assignment:
        if not self.arms:
            return Assignment("", "", default_model, "")
        pinned = self.overrides.get(user_id)
        if pinned is not None:
            arm = next(a for a in self.arms if a.name == pinned)
        else:
            position = bucket(self.name, user_id)
            arm = next(a for a in self.arms if position < a.upper)
        return Assignment(self.name, arm.name, arm.model, arm.version)


NO_EXPERIMENT = ExperimentConfig()


def bucket(experiment: str, user_id: str) -> int:
    """Stable bucket in [0, BUCKETS): the same user lands in the same arm on every replica."""
    digest = hashlib.sha1(f"{experiment}:{user_id}".encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


# --------------------------------------------------------------------------- parsing


def _mapping(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ExperimentsError(f"{where} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ExperimentsError(f"{where}: unknown keys {unknown}; known: {sorted(allowed)}")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ExperimentsError(f"{where} must be a name of letters, digits, '_', '.', '-', got {value!r}")
    return value


def _version(value: Any, where: str) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ExperimentsError(f'{where} must be a version number like "2", got {value!r}')
    return str(int(value))


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ExperimentsError(f"{where} must be a number within 0..100, got {value!r}")
    if abs(value * 100 - round(value * 100)) > 1e-6:
        raise ExperimentsError(f"{where}: percents go in steps of 0.01 (1 bucket of {BUCKETS}), got {value!r}")
    return float(value)


def parse(doc: Any, default_model: str, default_max_in_flight: int = 8) -> ExperimentConfig:
    if doc is None:
        return NO_EXPERIMENT
    doc = _mapping(doc, "experiments file", {"name", "arms", "overrides", "shadow"})
    arms: list[Arm] = []
    raw_arms = doc.get("arms") or []
    if not isinstance(raw_arms, list):
        raise ExperimentsError("arms must be a list of {name, model, version, percent}")
    name = ""
    if raw_arms:
        name = _name(doc.get("name"), "name")
        upper = 0
        for index, raw in enumerate(raw_arms):
            where = f"arms[{index}]"
            raw = _mapping(raw, where, {"name", "model", "version", "percent"})
            if "percent" not in raw:
                raise ExperimentsError(f"{where} needs a percent")
            percent = _percent(raw["percent"], f"{where}.percent")
            upper += round(percent * 100)
            arms.append(
                Arm(
                    name=_name(raw.get("name"), f"{where}.name"),
                    model=_name(raw.get("model", default_model), f"{where}.model"),
                    version=_version(raw.get("version"), f"{where}.version"),
                    percent=percent,
                    upper=upper,
                )
            )
        if upper != BUCKETS:
            raise ExperimentsError(f"arms' percents must sum to 100, they sum to {upper / 100:g}")
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ExperimentsError(f"arm names must be unique, got {names}")
    elif "name" in doc:
        name = _name(doc["name"], "name")
    overrides = doc.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ExperimentsError("overrides must map user ids to arm names")
    known = {a.name for a in arms}
    for user, arm in overrides.items():
        if not isinstance(arm, str) or arm not in known:
            raise ExperimentsError(f"overrides: user {user!r} is pinned to unknown arm {arm!r}; arms: {sorted(known)}")
    # YAML reads an id like 123 as a number; user ids arrive as strings.
    overrides = {str(user): arm for user, arm in overrides.items()}
    shadow = None
    if doc.get("shadow") is not None:
        raw = _mapping(doc["shadow"], "shadow", {"model", "version", "percent", "max_in_flight", "timeout_seconds"})
        in_flight = raw.get("max_in_flight", default_max_in_flight)
        if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
            raise ExperimentsError(f"shadow.max_in_flight must be an integer >= 1, got {in_flight!r}")
        timeout = raw.get("timeout_seconds", 1.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ExperimentsError(f"shadow.timeout_seconds must be a number > 0, got {timeout!r}")
        shadow = Shadow(
            model=_name(raw.get("model", default_model), "shadow.model"),
            version=_version(raw.get("version"), "shadow.version"),
            percent=_percent(raw.get("percent", 100), "shadow.percent"),
            max_in_flight=in_flight,
            timeout_seconds=float(timeout),
        )
    return ExperimentConfig(name=name, arms=tuple(arms), overrides=overrides, shadow=shadow)


def load(path: Path, default_model: str, default_max_in_flight: int = 8) -> ExperimentConfig:
    try:
        text = path.read_text()
    except OSError as error:
        raise ExperimentsError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        # JSON is YAML, but its own parser gives the better message for a .json file.
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ExperimentsError(f"{path} does not parse: {error}") from None
    try:
        return parse(doc, default_model, default_max_in_flight)
    except ExperimentsError as error:
        raise ExperimentsError(f"{path}: {error}") from None


# --------------------------------------------------------------------------- live config


class _Stamp(NamedTuple):
    """What tells that the file changed."""

    mtime_ns: int
    size: int
    inode: int


def _signature(path: Path) -> _Stamp | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _Stamp(stat.st_mtime_ns, stat.st_size, stat.st_ino)


class Experiments:
    """The configuration in force, reloaded from its file when the file changes."""

    def __init__(
        self,
        path: str | Path | None,
        default_model: str,
        default_max_in_flight: int = 8,
        on_reload: Any = None,
    ) -> None:
        self.path = Path(path) if path else None
        self.default_model = default_model
        self._max_in_flight = default_max_in_flight
        # on_reload(result): "ok" or "error", for the reload counter.
        self._on_reload = on_reload
        self.config = NO_EXPERIMENT
        self._signature: _Stamp | None = None
        if self.path is not None:
            # A broken file at start is a configuration error: fail loudly, like settings do.
            self._signature = _signature(self.path)
            self.config = load(self.path, default_model, default_max_in_flight)
            log.info("experiments loaded", **self.describe())

    def assign(self, user_id: str) -> Assignment:
        return self.config.assign(user_id, self.default_model)

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "path": str(self.path),
            "experiment": config.name,
            "arms": {a.name: f"{a.model}:{a.version or 'newest'} {a.percent:g}%" for a in config.arms},
            "shadow": f"{config.shadow.model}:{config.shadow.version or 'newest'} {config.shadow.percent:g}%"
            if config.shadow
            else "",
        }

    def check(self, force: bool = False) -> bool:
        """Reload if the file changed (or `force`); True when a new configuration is in force."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        if not force and signature == self._signature:
            return False
        if signature is not None and signature.size == 0:
            # An editor or `echo >` that truncates and then writes shows an empty file for a
            # moment: not a configuration. Not remembered, so the written file is read next
            # check; `{}` is how a file turns experiments off.
            if force:
                log.warning("experiments file is empty; the previous configuration keeps serving (`{}` clears it)")
            return False
        # Remembered even when the file is broken: it is reported once, not on every check.
        self._signature = signature
        try:
            config = load(self.path, self.default_model, self._max_in_flight)
        except Exception as error:  # noqa: BLE001 (whatever is wrong with the file, keep serving)
            log.error("experiments file rejected; the previous configuration keeps serving", error=str(error))
            self._report("error")
            return False
        self.config = config
        log.info("experiments reloaded", **self.describe())
        self._report("ok")
        return True

    def _report(self, result: str) -> None:
        if self._on_reload is not None:
            self._on_reload(result)

    async def watch(self, interval: float) -> None:
        """Poll the file's mtime/size/inode every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # a watcher that dies would silently freeze the config
                log.exception("experiments check failed")
