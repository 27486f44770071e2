"""The model repository: <root>/<model>/<version>/model.onnx plus <root>/<model>/config.json.

Control modes (SCORING_MODEL_CONTROL_MODE), as in Triton:
- poll: load everything at start, then rescan every SCORING_REPOSITORY_POLL_SECONDS; new or
  changed versions load in the background, warm up, and only then take traffic;
- explicit: load only what SCORING_LOAD_MODELS names at start ("*" = all) and what
  RepositoryModelLoad asks for; RepositoryModelUnload unloads;
- none: load everything once at start.

Swaps never fail requests: a request holds a lease on the version it resolved, a retired
version leaves the routing table at once but is freed only when its last lease is returned
(its queue drained). A version that fails to load (corrupt file, failed warmup, config at
odds with the model) is reported in RepositoryIndex and the log, the versions already
serving keep serving, and it is not retried until its file or config changes.

Memory budget (SCORING_MODEL_MEMORY_BUDGET_BYTES; 0 = none): a version is reckoned to hold
its model file once per instance (models.memory_estimate, as ModelStatistics reports). A
load that would take the serving versions over the budget first unloads whole other models,
least recently used first (a request leasing a version uses it; so does loading it), never
the model being loaded, one with requests in flight or one being loaded itself. If that
cannot make room, or the version alone exceeds the budget, the version fails to load like
any broken one (reported, older versions keep serving) and nothing is unloaded. An evicted
model stays unloaded, in every mode, until RepositoryModelLoad loads it again (which also
retries versions refused for the budget): nothing loads it behind the operator's back, so
traffic can never make two models push each other out in turn. In mode none nothing could
load it again, so nothing is evicted there. The budget bounds the serving versions; one being
swapped out or unloaded holds its memory until its in-flight requests are answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.logs import get_logger
from services.scoring.config import CONFIG_FILE, MODEL_FILE, ConfigError, ModelConfig, read_config
from services.scoring.models import (
    READY,
    UNAVAILABLE,
    UNLOADING,
    LoadOptions,
    ModelLoadError,
    ModelVersion,
    build_version,
    memory_estimate,
)
from services.scoring.stats import ScoringMetrics

log = get_logger(__name__)

POLL, EXPLICIT, NONE = "poll", "explicit", "none"
CONTROL_MODES = (POLL, EXPLICIT, NONE)

Fingerprint = tuple[object, ...]

EVICTED = "unloaded: memory budget (LRU)"
# Named in refusals, so an operator knows what to raise.
BUDGET_VARIABLE = "SCORING_MODEL_MEMORY_BUDGET_BYTES"


@dataclass(frozen=True)
class RepositoryOptions:
    mode: str = POLL
    poll_seconds: float = 2.0
    startup_models: tuple[str, ...] = ()  # explicit mode; ("*",) = every model
    load: LoadOptions = field(default_factory=LoadOptions)
    # Bytes of loaded model versions (SCORING_MODEL_MEMORY_BUDGET_BYTES); 0 = no budget.
    memory_budget_bytes: int = 0


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass
class Failure:
    fingerprint: Fingerprint
    reason: str
    budget: bool = False  # refused for the memory budget: RepositoryModelLoad retries it


@dataclass(frozen=True)
class Candidate:
    """A loaded model as the memory budget sees it."""

    name: str
    last_used: float  # time.monotonic() of its most recent use
    byte_size: int
    evictable: bool  # idle (no request in flight) and not being loaded


def plan_evictions(candidates: Sequence[Candidate], in_use: int, needed: int, budget: int) -> list[Candidate] | None:
    """The least recently used evictable models to unload so that `needed` more bytes fit.

    `in_use` counts every candidate's bytes (and any others that stay). [] when it fits as is;
    None when even unloading every evictable candidate would not make room (then unload none).
    """
    chosen: list[Candidate] = []
    for candidate in sorted((c for c in candidates if c.evictable), key=lambda c: (c.last_used, c.name)):
        if in_use + needed <= budget:
            break
        chosen.append(candidate)
        in_use -= candidate.byte_size
    return chosen if in_use + needed <= budget else None


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


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _versions_on_disk(directory: Path) -> dict[int, tuple[int, int]]:
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


class ModelRepository:
    def __init__(
        self, root: Path, options: RepositoryOptions | None = None, metrics: ScoringMetrics | None = None
    ) -> None:
        self.root = Path(root)
        self.options = options or RepositoryOptions()
        if self.options.mode not in CONTROL_MODES:
            raise ValueError(f"model control mode {self.options.mode!r}: use one of {CONTROL_MODES}")
        self._metrics = metrics
        self.memory_budget = self.options.memory_budget_bytes
        if self.memory_budget < 0:
            raise ValueError(f"memory budget {self.memory_budget}: use a number of bytes, 0 = no budget")
        # Checking the budget, evicting and loading happen under it, one load at a time.
        self._budget_lock = asyncio.Lock()
        if metrics is not None:
            metrics.model_memory_budget.set(self.memory_budget)
            metrics.model_memory.set(0)
        self._entries: dict[str, ModelEntry] = {}
        # One load at a time: loading is CPU-heavy and serving must keep its cores.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.repository_error = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.options.mode == EXPLICIT:
            names = self.options.startup_models
            if "*" in names:
                names = tuple(self._names_on_disk())
            for name in names:
                self._entry(name).required = True
                try:
                    await self.load(name)
                except (NotFound, InvalidArgument) as error:
                    log.error("startup model failed to load", model=name, error=str(error))
        else:
            await self.poll_once()
        if self.options.mode == POLL:
            self._poller = asyncio.create_task(self._poll_forever(), name="repository poller")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for entry in self._entries.values():
            async with entry.lock:
                versions = list(entry.serving.values())
                entry.serving.clear()
                entry.publish()
            for version in versions:
                self._retire(entry, version)
        await asyncio.gather(*self._background, return_exceptions=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_seconds)
            try:
                await self.poll_once()
            except Exception:  # the next poll may do better; never stop polling
                log.exception("repository poll failed")

    def _names_on_disk(self) -> list[str]:
        try:
            children = sorted(self.root.iterdir())
        except OSError as error:
            message = f"model repository {self.root} is unreadable: {error}"
            if self.repository_error != message:
                log.error("model repository unreadable; models already loaded keep serving", path=str(self.root), error=str(error))
            self.repository_error = message
            return []
        self.repository_error = ""
        return [c.name for c in children if c.is_dir() and not c.name.startswith(".")]

    async def poll_once(self) -> None:
        names = self._names_on_disk()
        if self.repository_error:
            return  # an unreadable root is not an empty one: unload nothing
        for name in names:
            await self._sync(self._entry(name))
        for name in set(self._entries) - set(names):
            entry = self._entries.pop(name)
            if entry.serving:
                log.warning("model directory removed; unloading", model=name)
                await self._unload_entry(entry)

    def _entry(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = ModelEntry(name, self.root / name)
        return entry

    # ------------------------------------------------------------------ explicit control

    async def load(self, name: str, config_override: str | None = None) -> None:
        """RepositoryModelLoad: load (or refresh) one model; raises if nothing of it can serve."""
        if self.options.mode == NONE:
            raise FailedPrecondition("model control mode is 'none': models load only at start")
        if not name or name.startswith(".") or "/" in name or not (self.root / name).is_dir():
            raise NotFound(f"no model {name!r} in the repository {self.root}")
        entry = self._entry(name)
        evicted = entry.evicted
        entry.unloaded = False
        entry.evicted = ""
        # An override lasts until the next load request, as in Triton; polls keep it.
        entry.config_override = config_override
        await self._sync(entry, retry_budget=True)
        if evicted and not entry.serving:
            # Still out (the error below says why): a failed reload leaves the model as the
            # budget left it, unloaded and not holding up readiness, rather than "required".
            entry.unloaded, entry.evicted, entry.required = True, evicted, False
        if entry.serving:
            entry.required = True
        if entry.config_error:
            raise InvalidArgument(f"failed to load {name!r}: {entry.config_error}")
        newest_failure = max(entry.failures, default=0)
        if not entry.serving or newest_failure > max(entry.serving):
            reasons = "; ".join(f"version {v}: {f.reason}" for v, f in sorted(entry.failures.items()))
            serving = f"; still serving {sorted(entry.serving)}" if entry.serving else ""
            raise InvalidArgument(f"failed to load {name!r}: {reasons or 'no <version>/model.onnx'}{serving}")

    async def unload(self, name: str) -> None:
        if self.options.mode != EXPLICIT:
            raise FailedPrecondition(
                f"model control mode is {self.options.mode!r}: unloading needs SCORING_MODEL_CONTROL_MODE=explicit"
            )
        entry = self._entries.get(name)
        if entry is None or (not entry.serving and not (self.root / name).is_dir()):
            raise NotFound(f"no model {name!r} in the repository {self.root}")
        await self._unload_entry(entry)

    async def _unload_entry(self, entry: ModelEntry) -> None:
        async with entry.lock:
            versions = self._take_out(entry)
        # Answered once in-flight requests are done and the sessions are freed, as in Triton.
        await asyncio.gather(*(self._retire(entry, version) for version in versions))
        log.info("model unloaded", model=entry.name, versions=[v.version for v in versions])

    @staticmethod
    def _take_out(entry: ModelEntry, evicted: str = "") -> list[ModelVersion]:
        """Out of routing and marked unloaded (not holding up readiness); returns the versions
        that served, for the caller to retire. `evicted`: why the memory budget took it out."""
        entry.unloaded, entry.evicted, entry.required = True, evicted, False
        versions = list(entry.serving.values())
        entry.serving.clear()
        entry.publish()
        return versions

    # ------------------------------------------------------------------ syncing with disk

    def _read_config(self, entry: ModelEntry) -> tuple[ModelConfig, str] | None:
        config_path = entry.directory / CONFIG_FILE
        try:
            text = entry.config_override if entry.config_override is not None else (
                config_path.read_text() if config_path.is_file() else "{}"
            )
            config = read_config(entry.directory, text)
        except (OSError, ConfigError) as error:
            message = f"{CONFIG_FILE}: {error}"
            if message != entry.config_error:
                log.error("model config rejected; versions already loaded keep serving", model=entry.name, error=message)
            entry.config_error = message
            return None
        entry.config_error = ""
        return config, _digest(text)

    async def _sync(self, entry: ModelEntry, retry_budget: bool = False) -> None:
        async with entry.lock:
            if entry.unloaded and (self.options.mode == EXPLICIT or entry.evicted):
                return  # evicted: in every mode, only a load request brings it back
            entry.unloaded = False
            entry.attempted = True
            if self.options.mode != EXPLICIT:
                entry.required = True
            read = self._read_config(entry)
            if read is None:
                return
            config, config_digest = read
            on_disk = {v: (stamp, config_digest) for v, stamp in _versions_on_disk(entry.directory).items()}
            for gone in set(entry.failures) - set(on_disk):
                del entry.failures[gone]
            if retry_budget:
                for refused in [v for v, f in entry.failures.items() if f.budget]:
                    del entry.failures[refused]
            wanted = await self._load_wanted(entry, config, on_disk)
            for number in [v for v in entry.serving if v not in wanted]:
                self._retire(entry, entry.serving.pop(number))
            entry.publish()

    async def _load_wanted(
        self, entry: ModelEntry, config: ModelConfig, on_disk: dict[int, Fingerprint]
    ) -> list[int]:
        """Load what the policy wants, skipping known-broken versions, until nothing changes.

        A version whose current file already failed is skipped, so the policy falls back to
        older ones; one still serving from an earlier good file stays wanted and keeps serving.
        """

        def failed(v: int) -> bool:
            failure = entry.failures.get(v)
            return failure is not None and failure.fingerprint == on_disk[v]

        while True:
            wanted = config.version_policy.select([v for v in on_disk if v in entry.serving or not failed(v)])
            stale = [
                v
                for v in wanted
                if not failed(v) and (v not in entry.serving or entry.serving[v].fingerprint != on_disk[v])
            ]
            if not stale:
                return wanted
            for number in sorted(stale, reverse=True):
                await self._load_version(entry, config, number, on_disk[number], wanted)

    async def _load_version(
        self, entry: ModelEntry, config: ModelConfig, number: int, fingerprint: Fingerprint, wanted: Collection[int]
    ) -> None:
        loop = asyncio.get_running_loop()
        log.info("loading model version", model=entry.name, version=number)
        async with self._budget_lock:
            refused = await self._make_room(entry, config, number, wanted)
            if refused:
                self._failed(entry, number, fingerprint, refused, budget=True)
                return
            try:
                version = await loop.run_in_executor(
                    self._loader, build_version, entry.directory, number, config, self.options.load, fingerprint
                )
            except Exception as error:  # whatever the cause, a broken version is reported, not retried
                reason = str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"
                self._failed(entry, number, fingerprint, reason)
                return
            version.activate(self._metrics)
            entry.failures.pop(number, None)
            previous = entry.serving.get(number)
            entry.serving[number] = version
            entry.publish()
            if previous is not None:
                self._retire(entry, previous)
            self._publish_memory()
        log.info(
            "model version ready",
            model=entry.name,
            version=number,
            provider=version.provider,
            reason=version.provider_reason,
            io_binding=version.io_binding,
            instances=len(version.instances),
            max_batch_size=config.batching.max_batch_size,
        )

    def _failed(self, entry: ModelEntry, number: int, fingerprint: Fingerprint, reason: str, budget: bool = False) -> None:
        entry.failures[number] = Failure(fingerprint, reason, budget)
        log.error(
            "model version failed to load; versions already loaded keep serving",
            model=entry.name,
            version=number,
            error=reason,
            serving=sorted(entry.serving),
        )

    # ------------------------------------------------------------------ memory budget

    async def _make_room(self, entry: ModelEntry, config: ModelConfig, number: int, wanted: Collection[int]) -> str:
        """Evict least recently used models so the version fits; the refusal reason if it cannot.

        Counts what will serve once this load is done: other models' serving versions and this
        model's that its version policy keeps (not the one this load replaces).
        """
        budget = self.memory_budget
        if not budget:
            return ""
        try:
            file_bytes = (entry.directory / str(number) / MODEL_FILE).stat().st_size
        except OSError:
            return ""  # the load itself reports the unreadable file
        needed = memory_estimate(file_bytes, config.instance_count)
        if needed > budget:
            return (
                f"memory budget: this version needs about {needed} bytes ({file_bytes}-byte model file x "
                f"{config.instance_count} instance(s)), more than the whole budget of {budget} bytes ({BUDGET_VARIABLE})"
            )
        staying = sum(v.byte_size for n, v in entry.serving.items() if n in wanted and n != number)
        others = {e.name: e for e in self._entries.values() if e is not entry and e.serving}
        candidates = [
            Candidate(
                name=e.name,
                last_used=max(v.last_used for v in e.serving.values()),
                byte_size=sum(v.byte_size for v in e.serving.values()),
                # A locked entry is being loaded or unloaded by someone else right now.
                evictable=not e.lock.locked() and not any(v.in_flight for v in e.serving.values()),
            )
            for e in others.values()
        ]
        in_use = staying + sum(c.byte_size for c in candidates)
        if self.options.mode == NONE:  # nothing could load an evicted model again
            candidates = []
        plan = plan_evictions(candidates, in_use, needed, budget)
        if plan is None:
            busy = sorted(c.name for c in candidates if not c.evictable)
            return (
                f"memory budget: this version needs about {needed} bytes; {in_use} of {budget} bytes ({BUDGET_VARIABLE}) "
                f"are in use and unloading idle models cannot free enough"
                + (f" (busy: {', '.join(busy)})" if busy else "")
                + (" (model control mode 'none' unloads nothing)" if self.options.mode == NONE else "")
            )
        if not plan:
            return ""
        # No await since the candidates were taken: none has gained a request or a lock since.
        now = time.monotonic()
        reason = f"{EVICTED}, for {entry.name!r} version {number}; RepositoryModelLoad loads it again"
        retiring = []
        for candidate in plan:
            victim = others[candidate.name]
            versions = self._take_out(victim, evicted=reason)
            log.warning(
                "model unloaded: memory budget (LRU)",
                model=victim.name,
                versions=[v.version for v in versions],
                bytes=candidate.byte_size,
                idle_seconds=round(now - candidate.last_used, 3),
                for_model=entry.name,
                for_version=number,
                needed_bytes=needed,
                in_use_bytes=in_use,
                budget_bytes=budget,
            )
            for version in versions:
                if self._metrics is not None:
                    self._metrics.evictions.labels(victim.name, version.version).inc()
                retiring.append(self._retire(victim, version))
        # Idle, so freed at once; waiting means the memory is back before the new version loads.
        await asyncio.gather(*retiring)
        return ""

    def _publish_memory(self) -> None:
        if self._metrics is not None:
            # Every version holding memory: serving, or retiring until it has drained.
            held = (v for e in self._entries.values() for v in (*e.serving.values(), *e.retiring.values()))
            self._metrics.model_memory.set(sum(v.byte_size for v in held))

    def _retire(self, entry: ModelEntry, version: ModelVersion) -> asyncio.Task[None]:
        """Out of routing now (the caller removed it); freed once its in-flight requests finish."""
        entry.retiring[id(version)] = version

        async def retire() -> None:
            try:
                await version.retire()
            finally:
                entry.retiring.pop(id(version), None)
                self._publish_memory()

        task = asyncio.create_task(retire(), name=f"retire {entry.name} v{version.version}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ lookups

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        entry = self._entries.get(name)
        if entry is None or entry.latest is None:
            raise NotFound(f"unknown model {name!r}{self._why_missing(entry)}")
        if not version:
            return entry.latest
        try:
            number = int(version)
        except ValueError:
            raise NotFound(f"model {name!r} has no version {version!r}; versions are integers") from None
        found = entry.serving.get(number)
        if found is None:
            failure = entry.failures.get(number)
            why = f" (it failed to load: {failure.reason})" if failure else ""
            raise NotFound(f"model {name!r} has no ready version {version!r}{why}; ready: {sorted(entry.serving)}")
        return found

    def _why_missing(self, entry: ModelEntry | None) -> str:
        if entry is None:
            loaded = ", ".join(sorted(n for n, e in self._entries.items() if e.latest)) or "none"
            return f"; loaded: {loaded}"
        return f" ({self._missing_reason(entry)})"

    @staticmethod
    def _missing_reason(entry: ModelEntry) -> str:
        if entry.evicted:
            return entry.evicted
        if entry.config_error:
            return entry.config_error
        if entry.failures:
            return "; ".join(f"version {v}: {f.reason}" for v, f in sorted(entry.failures.items()))
        return "unloaded" if entry.unloaded else "no <version>/model.onnx"

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
            return [v for _, v in sorted(self._entries[name].serving.items())]
        return [v for e in sorted(self._entries.values(), key=lambda e: e.name) for _, v in sorted(e.serving.items())]

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        rows: list[IndexEntry] = []
        names = sorted(set(self._entries) | set(self._names_on_disk()))
        for name in names:
            entry = self._entries.get(name)
            if entry is None:
                rows.append(IndexEntry(name, "", "", ""))
                continue
            listed = False
            for number, version in sorted(entry.serving.items()):
                reason = f"{version.provider}: {version.provider_reason}"
                rows.append(IndexEntry(name, version.version, READY, reason))
                listed = True
            if ready_only:
                continue
            for version in entry.retiring.values():
                rows.append(IndexEntry(name, version.version, UNLOADING, "draining in-flight requests"))
                listed = True
            for number, failure in sorted(entry.failures.items()):
                if number not in entry.serving:
                    rows.append(IndexEntry(name, str(number), UNAVAILABLE, failure.reason))
                    listed = True
            if entry.config_error and not entry.evicted:
                rows.append(IndexEntry(name, "", UNAVAILABLE, entry.config_error))
            elif entry.evicted and not entry.serving:
                rows.append(IndexEntry(name, "", UNAVAILABLE, entry.evicted))
            elif not listed:
                state = UNAVAILABLE if entry.attempted or entry.unloaded else ""
                rows.append(IndexEntry(name, "", state, self._missing_reason(entry) if state else ""))
        return rows

    def readiness(self) -> tuple[bool, str]:
        """Ready when every model that should serve has a ready version (strict, like Triton)."""
        if self.repository_error:
            return False, self.repository_error
        expected = [e for e in self._entries.values() if e.required]
        if not any(e.latest for e in expected):
            return False, "no model loaded" + (
                ": " + "; ".join(f"{e.name}{self._why_missing(e)}" for e in expected) if expected else ""
            )
        missing = [f"{e.name}{self._why_missing(e)}" for e in expected if e.latest is None]
        if missing:
            return False, "models without a ready version: " + "; ".join(missing)
        return True, f"{sum(len(e.serving) for e in expected)} model version(s) ready"

    @property
    def loaded(self) -> dict[str, ModelVersion]:
        """Latest ready version per model."""
        return {name: e.latest for name, e in self._entries.items() if e.latest is not None}
