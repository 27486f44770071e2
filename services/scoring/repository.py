"""The model repository: <root>/<model>/<version>/model.onnx plus <root>/<model>/config.json,
or Triton's <root>/<model>/config.pbtxt (pbtxt.py; which one wins: discovery.py).

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
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.runtime.limits import echo
from services.runtime.logs import get_logger
from services.scoring.budget import BUDGET_VARIABLE, EVICTED, Candidate, MemoryBudget, plan_evictions
from services.scoring.discovery import RepositoryRoot
from services.scoring.live import LiveModels, ModelEntry
from services.scoring.loading import LoadOptions
from services.scoring.models import ModelVersion
from services.scoring.reconcile import Reconciler
from services.scoring.report import IndexEntry, repository_index, server_readiness
from services.scoring.stats import ScoringMetrics

# Where each concern lives: discovery (what is on disk, which config file, the version
# policy), config and pbtxt (config.json, config.pbtxt -> ModelConfig), loading and
# warmup (building a version), live (serving versions, leases, hot swap, retirement),
# budget (memory budget, LRU eviction), reconcile (one model in line with its directory),
# report (RepositoryIndex, readiness). Names other modules import from here stay here.
__all__ = [
    "BUDGET_VARIABLE",
    "CONTROL_MODES",
    "ControlMode",
    "EVICTED",
    "Candidate",
    "IndexEntry",
    "ModelRepository",
    "RepositoryOptions",
    "plan_evictions",
]

log = get_logger(__name__)

POLL, EXPLICIT, NONE = "poll", "explicit", "none"
ControlMode = Literal["poll", "explicit", "none"]
CONTROL_MODES: tuple[ControlMode, ...] = get_args(ControlMode)


@dataclass(frozen=True)
class RepositoryOptions:
    mode: str = POLL
    poll_seconds: float = 2.0
    startup_models: tuple[str, ...] = ()  # explicit mode; ("*",) = every model
    load: LoadOptions = field(default_factory=LoadOptions)
    # Bytes of loaded model versions (SCORING_MODEL_MEMORY_BUDGET_BYTES); 0 = no budget.
    memory_budget_bytes: int = 0


class ModelRepository:
    """The model control modes and the Triton repository extension over the parts above."""

    def __init__(
        self, root: Path, options: RepositoryOptions | None = None, metrics: ScoringMetrics | None = None
    ) -> None:
        self.root = Path(root)
        self.options = options or RepositoryOptions()
        if self.options.mode not in CONTROL_MODES:
            raise ValueError(f"model control mode {self.options.mode!r}: use one of {CONTROL_MODES}")
        self._disk = RepositoryRoot(self.root)
        self._live = LiveModels(self.root, metrics)
        # In mode none nothing could load an evicted model again, so nothing is evicted there.
        self._budget = MemoryBudget(
            self.options.memory_budget_bytes, self._live, can_evict=self.options.mode != NONE, metrics=metrics
        )
        self._reconciler = Reconciler(
            self._live, self._budget, self.options.load, explicit=self.options.mode == EXPLICIT
        )
        self._poller: asyncio.Task[None] | None = None

    @property
    def memory_budget(self) -> int:
        return self._budget.bytes

    @property
    def repository_error(self) -> str:
        """Why the root is unreadable; "" while it reads."""
        return self._disk.error

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.options.mode == EXPLICIT:
            await self._load_startup_models()
        else:
            await self.poll_once()
        if self.options.mode == POLL:
            self._poller = asyncio.create_task(self._poll_forever(), name="repository poller")

    async def _load_startup_models(self) -> None:
        names = self.options.startup_models
        if "*" in names:
            names = tuple(self._disk.model_names())
        for name in names:
            self._live.entry(name).required = True
            try:
                await self.load(name)
            except (NotFound, InvalidArgument) as error:
                log.error("startup model failed to load", model=name, error=str(error))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self._live.close()
        self._reconciler.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_seconds)
            try:
                await self.poll_once()
            except Exception:  # the next poll may do better; never stop polling
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        names = self._disk.model_names()
        if self._disk.error:
            return  # an unreadable root is not an empty one: unload nothing
        for name in names:
            await self._reconciler.sync(self._live.entry(name))
        for name in set(self._live.entries) - set(names):
            entry = self._live.entries.pop(name)
            if entry.serving:
                log.warning("model directory removed; unloading", model=name)
                await self._live.unload(entry)

    # ------------------------------------------------------------------ explicit control

    async def load(self, name: str, config_override: str | None = None) -> None:
        """RepositoryModelLoad: load (or refresh) one model; raises if nothing of it can serve."""
        if self.options.mode == NONE:
            raise FailedPrecondition("model control mode is 'none': models load only at start")
        if not _may_be_in_repository(name) or not (self.root / name).is_dir():
            raise NotFound(f"no model {echo(name)} in the repository {self.root}")
        entry = self._live.entry(name)
        evicted = entry.evicted
        entry.unloaded = False
        entry.evicted = ""
        # An override lasts until the next load request, as in Triton; polls keep it.
        entry.config_override = config_override
        await self._reconciler.sync(entry, retry_budget=True)
        if evicted and not entry.serving:
            # Still out (the error below says why): a failed reload leaves the model as the
            # budget left it, unloaded and not holding up readiness, rather than "required".
            entry.unloaded, entry.evicted, entry.required = True, evicted, False
        if entry.serving:
            entry.required = True
        _raise_unless_loaded(entry)

    async def unload(self, name: str) -> None:
        if self.options.mode != EXPLICIT:
            raise FailedPrecondition(
                f"model control mode is {self.options.mode!r}: unloading needs SCORING_MODEL_CONTROL_MODE=explicit"
            )
        entry = self._live.entries.get(name)
        in_repository = _may_be_in_repository(name) and (self.root / name).is_dir()
        if entry is None or (not entry.serving and not in_repository):
            raise NotFound(f"no model {echo(name)} in the repository {self.root}")
        await self._live.unload(entry)

    # ------------------------------------------------------------------ lookups

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        return self._live.resolve(name, version)

    def lease(self, name: str, version: str = "") -> AbstractContextManager[ModelVersion]:
        """The version to serve a request, kept alive until the request is answered (live.py)."""
        return self._live.lease(name, version)

    def versions(self, name: str = "", version: str = "") -> list[ModelVersion]:
        """Ready versions for statistics/metadata; NOT_FOUND when a named one is not ready."""
        return self._live.versions(name, version)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        return repository_index(self._live.entries, self._disk.model_names(), ready_only)

    def readiness(self) -> tuple[bool, str]:
        """Ready when every model that should serve has a ready version (strict, like Triton)."""
        return server_readiness(self._live, self._disk.error)

    @property
    def loaded(self) -> dict[str, ModelVersion]:
        """Latest ready version per model."""
        return self._live.loaded


def _raise_unless_loaded(entry: ModelEntry) -> None:
    """A load request's answer: INVALID_ARGUMENT unless its newest version on disk serves."""
    if entry.config_error:
        raise InvalidArgument(f"failed to load {entry.name!r}: {entry.config_error}")
    newest_failure = max(entry.failures, default=0)
    if not entry.serving or newest_failure > max(entry.serving):
        serving = f"; still serving {sorted(entry.serving)}" if entry.serving else ""
        reasons = entry.failure_reasons() or "no <version>/model.onnx"
        raise InvalidArgument(f"failed to load {entry.name!r}: {reasons}{serving}")


# A directory name (not a path, not hidden) the file system can hold: anything else is no
# model of the repository, and asking the file system about it would fail (ENAMETOOLONG,
# an embedded NUL).
_MAX_NAME_BYTES = 255


def _may_be_in_repository(name: str) -> bool:
    if not name or name.startswith(".") or "/" in name or "\x00" in name:
        return False
    return len(name.encode("utf-8", "replace")) <= _MAX_NAME_BYTES
