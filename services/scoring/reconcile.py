"""Bringing one model's live versions in line with its directory: load, swap in, retire.

New or changed versions load in the background (one at a time, in the loader thread), warm
up, and only then take traffic; the versions its policy no longer wants retire. A version
that fails to load (corrupt file, failed warmup, config at odds with the model, no room in
the memory budget) is reported, the versions already serving keep serving, and it is not
retried until its file or config changes (or, refused for the budget, a load request asks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from services.runtime.logs import get_logger
from services.scoring.budget import MemoryBudget
from services.scoring.config import ConfigError, ModelConfig
from services.scoring.discovery import Fingerprint, plan_versions, read_model_config, version_fingerprints
from services.scoring.live import Failure, LiveModels, ModelEntry
from services.scoring.loading import LoadOptions, build_version
from services.scoring.models import ModelLoadError, ModelVersion

log = get_logger(__name__)


class Reconciler:
    def __init__(self, live: LiveModels, budget: MemoryBudget, options: LoadOptions, *, explicit: bool) -> None:
        self._live = live
        self._budget = budget
        self._options = options
        # Model control mode explicit: only load requests bring an unloaded model back.
        self._explicit = explicit
        # One load at a time: loading is CPU-heavy and serving must keep its cores.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def sync(self, entry: ModelEntry, retry_budget: bool = False) -> None:
        """Load what the model's policy wants from disk and retire what it no longer wants.

        `retry_budget`: try versions the memory budget refused again (a load request).
        """
        async with entry.lock:
            if entry.unloaded and (self._explicit or entry.evicted):
                return  # evicted: in every mode, only a load request brings it back
            entry.unloaded = False
            entry.attempted = True
            if not self._explicit:
                entry.required = True
            read = self._read_config(entry)
            if read is None:
                return
            config, config_digest = read
            on_disk = version_fingerprints(entry.directory, config_digest)
            for gone in set(entry.failures) - set(on_disk):
                del entry.failures[gone]
            if retry_budget:
                for refused in [v for v, f in entry.failures.items() if f.budget]:
                    del entry.failures[refused]
            wanted = await self._load_wanted(entry, config, on_disk)
            self._live.retire_unwanted(entry, wanted)

    @staticmethod
    def _read_config(entry: ModelEntry) -> tuple[ModelConfig, str] | None:
        """The model's config and its digest; None (recorded in the entry) when it is wrong."""
        try:
            config, config_digest = read_model_config(entry.directory, entry.config_override)
        except ConfigError as error:
            if str(error) != entry.config_error:
                log.error(
                    "model config rejected; versions already loaded keep serving", model=entry.name, error=str(error)
                )
            entry.config_error = str(error)
            return None
        entry.config_error = ""
        return config, config_digest

    async def _load_wanted(self, entry: ModelEntry, config: ModelConfig, on_disk: dict[int, Fingerprint]) -> list[int]:
        """Load what the policy wants, skipping known-broken versions, until nothing changes."""
        while True:
            wanted, stale = plan_versions(
                config.version_policy,
                on_disk,
                serving={v: version.fingerprint for v, version in entry.serving.items()},
                failed={v: failure.fingerprint for v, failure in entry.failures.items()},
            )
            if not stale:
                return wanted
            for number in sorted(stale, reverse=True):
                await self._load_version(entry, config, number, on_disk[number], wanted)

    async def _load_version(
        self, entry: ModelEntry, config: ModelConfig, number: int, fingerprint: Fingerprint, wanted: Collection[int]
    ) -> None:
        log.info("loading model version", model=entry.name, version=number)
        async with self._budget.lock:
            refused = await self._budget.make_room(entry, config, number, wanted)
            if refused:
                self._failed(entry, number, fingerprint, refused, budget=True)
                return
            version = await self._build(entry, config, number, fingerprint)
            if version is None:
                return
            self._live.swap_in(entry, version)
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

    async def _build(
        self, entry: ModelEntry, config: ModelConfig, number: int, fingerprint: Fingerprint
    ) -> ModelVersion | None:
        """The loaded, warmed-up version, built in the loader thread; None (reported) if it fails."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._loader, build_version, entry.directory, number, config, self._options, fingerprint
            )
        except Exception as error:  # whatever the cause, a broken version is reported, not retried
            reason = str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"
            self._failed(entry, number, fingerprint, reason)
            return None

    @staticmethod
    def _failed(entry: ModelEntry, number: int, fingerprint: Fingerprint, reason: str, budget: bool = False) -> None:
        entry.failures[number] = Failure(fingerprint, reason, budget)
        log.error(
            "model version failed to load; versions already loaded keep serving",
            model=entry.name,
            version=number,
            error=reason,
            serving=sorted(entry.serving),
        )
