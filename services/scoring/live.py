"""The live model versions: what serves each model, what drains, and how requests find them.

Swaps never fail requests: a request holds a lease on the version it resolved; a version
taken out of routing (replaced, unloaded, evicted) leaves the routing table at once but is
freed only when its last lease is returned (its queue drained).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.errors import NotFound
from services.runtime.limits import echo
from services.runtime.logs import get_logger
from services.scoring.discovery import Fingerprint
from services.scoring.models import ModelVersion
from services.scoring.stats import ScoringMetrics

log = get_logger(__name__)


@dataclass
class Failure:
    fingerprint: Fingerprint
    reason: str
    budget: bool = False  # refused for the memory budget: RepositoryModelLoad retries it


@dataclass
class ModelEntry:
    name: str
    directory: Path
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    serving: dict[int, ModelVersion] = field(default_factory=dict)
    latest: ModelVersion | None = None
    failures: dict[int, Failure] = field(default_factory=dict)
    retiring: dict[int, ModelVersion] = field(default_factory=dict)
    config_error: str = ""
    config_override: str | None = None
    unloaded: bool = False  # explicitly unloaded (or never loaded in explicit mode)
    evicted: str = ""  # why the memory budget unloaded it; it stays unloaded until a load request
    attempted: bool = False
    # Counts for server readiness: every model in poll/none mode; in explicit mode the
    # startup models and those loaded since (a failed load request is the caller's error).
    required: bool = False

    def publish(self) -> None:
        self.latest = self.serving[max(self.serving)] if self.serving else None

    def take_out(self, evicted: str = "") -> list[ModelVersion]:
        """Out of routing and marked unloaded (not holding up readiness); returns the versions
        that served, for the caller to retire. `evicted`: why the memory budget took it out."""
        self.unloaded, self.evicted, self.required = True, evicted, False
        versions = list(self.serving.values())
        self.serving.clear()
        self.publish()
        return versions

    def failure_reasons(self) -> str:
        return "; ".join(f"version {v}: {f.reason}" for v, f in sorted(self.failures.items()))

    def missing_reason(self) -> str:
        """Why no version of it serves."""
        if self.evicted:
            return self.evicted
        if self.config_error:
            return self.config_error
        if self.failures:
            return self.failure_reasons()
        return "unloaded" if self.unloaded else "no <version>/model.onnx"


class LiveModels:
    """Every model the repository knows, its serving versions, and those still draining."""

    def __init__(self, root: Path, metrics: ScoringMetrics | None = None) -> None:
        self.root = root
        self.entries: dict[str, ModelEntry] = {}
        self._metrics = metrics
        self._background: set[asyncio.Task[None]] = set()

    def entry(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = ModelEntry(name, self.root / name)
        return entry

    # ------------------------------------------------------------------ hot swap

    def swap_in(self, entry: ModelEntry, version: ModelVersion) -> None:
        """Start a loaded version and route to it; the one it replaces (if any) retires."""
        version.activate(self._metrics)
        entry.failures.pop(version.number, None)
        previous = entry.serving.get(version.number)
        entry.serving[version.number] = version
        entry.publish()
        if previous is not None:
            self.retire(entry, previous)
        self.publish_memory()

    def retire_unwanted(self, entry: ModelEntry, wanted: Collection[int]) -> None:
        for number in [v for v in entry.serving if v not in wanted]:
            self.retire(entry, entry.serving.pop(number))
        entry.publish()

    async def unload(self, entry: ModelEntry) -> None:
        async with entry.lock:
            versions = entry.take_out()
        # Answered once in-flight requests are done and the sessions are freed, as in Triton.
        await asyncio.gather(*(self.retire(entry, version) for version in versions))
        log.info("model unloaded", model=entry.name, versions=[v.version for v in versions])

    def retire(self, entry: ModelEntry, version: ModelVersion) -> asyncio.Task[None]:
        """Out of routing now (the caller removed it); freed once its in-flight requests finish."""
        entry.retiring[id(version)] = version

        async def retire() -> None:
            try:
                await version.retire()
            finally:
                entry.retiring.pop(id(version), None)
                self.publish_memory()

        task = asyncio.create_task(retire(), name=f"retire {entry.name} v{version.version}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Route to nothing; returns once every version has drained and been freed."""
        for entry in self.entries.values():
            async with entry.lock:
                versions = list(entry.serving.values())
                entry.serving.clear()
                entry.publish()
            for version in versions:
                self.retire(entry, version)
        await asyncio.gather(*self._background, return_exceptions=True)

    def publish_memory(self) -> None:
        if self._metrics is not None:
            # Every version holding memory: serving, or retiring until it has drained.
            held = (v for e in self.entries.values() for v in (*e.serving.values(), *e.retiring.values()))
            self._metrics.model_memory.set(sum(v.byte_size for v in held))

    # ------------------------------------------------------------------ lookups

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        entry = self.entries.get(name)
        if entry is None or entry.latest is None:
            raise NotFound(f"unknown model {echo(name)}{self.why_missing(entry)}")
        if not version:
            return entry.latest
        try:
            number = int(version)
        except ValueError:
            raise NotFound(f"model {name!r} has no version {echo(version)}; versions are integers") from None
        found = entry.serving.get(number)
        if found is None:
            failure = entry.failures.get(number)
            why = f" (it failed to load: {failure.reason})" if failure else ""
            raise NotFound(f"model {name!r} has no ready version {version!r}{why}; ready: {sorted(entry.serving)}")
        return found

    def why_missing(self, entry: ModelEntry | None) -> str:
        if entry is None:
            loaded = ", ".join(sorted(n for n, e in self.entries.items() if e.latest)) or "none"
            return f"; loaded: {loaded}"
        return f" ({entry.missing_reason()})"

    @contextmanager
    def lease(self, name: str, version: str = "") -> Iterator[ModelVersion]:
        """The version to serve a request, kept alive until the request is answered.

        Leasing is what counts as using a model for the memory budget's LRU order; readiness,
        metadata and statistics calls resolve without leasing, so probes keep nothing loaded.
        """
        model = self.resolve(name, version)
        model.last_used = time.monotonic()
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    def versions(self, name: str = "", version: str = "") -> list[ModelVersion]:
        """Ready versions for statistics/metadata; NOT_FOUND when a named one is not ready."""
        if name:
            if version:
                return [self.resolve(name, version)]
            self.resolve(name)
            return [v for _, v in sorted(self.entries[name].serving.items())]
        return [v for e in sorted(self.entries.values(), key=lambda e: e.name) for _, v in sorted(e.serving.items())]

    @property
    def loaded(self) -> dict[str, ModelVersion]:
        """Latest ready version per model."""
        return {name: e.latest for name, e in self.entries.items() if e.latest is not None}
