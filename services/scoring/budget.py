"""The memory budget for loaded model versions (SCORING_MODEL_MEMORY_BUDGET_BYTES; 0 = none).

A version is reckoned to hold its model file once per instance (models.memory_estimate, as
ModelStatistics reports). A load that would take the serving versions over the budget first
unloads whole other models, least recently used first (a request leasing a version uses it;
so does loading it), never the model being loaded, one with requests in flight or one being
loaded itself. If that cannot make room, or the version alone exceeds the budget, the load is
refused with the reason and nothing is unloaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from services.runtime.logs import get_logger
from services.scoring.config import MODEL_FILE, ModelConfig
from services.scoring.live import LiveModels, ModelEntry
from services.scoring.models import memory_estimate
from services.scoring.stats import ScoringMetrics

log = get_logger(__name__)

EVICTED = "unloaded: memory budget (LRU)"
# Named in refusals, so an operator knows what to raise.
BUDGET_VARIABLE = "SCORING_MODEL_MEMORY_BUDGET_BYTES"


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


@dataclass(frozen=True)
class _Load:
    """The version a load wants room for."""

    entry: ModelEntry
    number: int
    needed: int  # bytes, by memory_estimate


class MemoryBudget:
    def __init__(
        self, budget_bytes: int, live: LiveModels, *, can_evict: bool, metrics: ScoringMetrics | None = None
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"memory budget {budget_bytes}: use a number of bytes, 0 = no budget")
        self.bytes = budget_bytes
        self._live = live
        # In model control mode none nothing could load an evicted model again.
        self._can_evict = can_evict
        self._metrics = metrics
        # Checking the budget, evicting and loading happen under it, one load at a time.
        self.lock = asyncio.Lock()
        if metrics is not None:
            metrics.model_memory_budget.set(budget_bytes)
            metrics.model_memory.set(0)

    async def make_room(self, entry: ModelEntry, config: ModelConfig, number: int, wanted: Collection[int]) -> str:
        """Evict least recently used models so the version fits; the refusal reason if it cannot.

        Counts what will serve once this load is done: other models' serving versions and this
        model's that its version policy keeps (not the one this load replaces). Hold `lock`.
        """
        if not self.bytes:
            return ""
        try:
            file_bytes = (entry.directory / str(number) / MODEL_FILE).stat().st_size
        except OSError:
            return ""  # the load itself reports the unreadable file
        load = _Load(entry, number, memory_estimate(file_bytes, config.instance_count))
        if load.needed > self.bytes:
            return (
                f"memory budget: this version needs about {load.needed} bytes ({file_bytes}-byte model file x "
                f"{config.instance_count} instance(s)), "
                f"more than the whole budget of {self.bytes} bytes ({BUDGET_VARIABLE})"
            )
        staying = sum(v.byte_size for n, v in entry.serving.items() if n in wanted and n != number)
        candidates = self._candidates(entry)
        in_use = staying + sum(c.byte_size for c in candidates)
        if not self._can_evict:
            candidates = []
        plan = plan_evictions(candidates, in_use, load.needed, self.bytes)
        if plan is None:
            return self._refusal(load, candidates, in_use)
        if plan:
            # Idle, so freed at once; waiting means the memory is back before the new version loads.
            await asyncio.gather(*self._evict(plan, load, in_use))
        return ""

    def _candidates(self, loading: ModelEntry) -> list[Candidate]:
        """Every other model that serves, as the budget sees it."""
        return [
            Candidate(
                name=e.name,
                last_used=max(v.last_used for v in e.serving.values()),
                byte_size=sum(v.byte_size for v in e.serving.values()),
                # A locked entry is being loaded or unloaded by someone else right now.
                evictable=not e.lock.locked() and not any(v.in_flight for v in e.serving.values()),
            )
            for e in self._live.entries.values()
            if e is not loading and e.serving
        ]

    def _refusal(self, load: _Load, candidates: Sequence[Candidate], in_use: int) -> str:
        busy = sorted(c.name for c in candidates if not c.evictable)
        return (
            f"memory budget: this version needs about {load.needed} bytes; "
            f"{in_use} of {self.bytes} bytes ({BUDGET_VARIABLE}) "
            f"are in use and unloading idle models cannot free enough"
            + (f" (busy: {', '.join(busy)})" if busy else "")
            + ("" if self._can_evict else " (model control mode 'none' unloads nothing)")
        )

    def _evict(self, plan: Sequence[Candidate], load: _Load, in_use: int) -> list[asyncio.Task[None]]:
        """Take the planned models out of routing; returns their retirements to wait for.

        No await since the candidates were taken: none has gained a request or a lock since.
        """
        now = time.monotonic()
        reason = f"{EVICTED}, for {load.entry.name!r} version {load.number}; RepositoryModelLoad loads it again"
        retiring = []
        for candidate in plan:
            victim = self._live.entries[candidate.name]
            versions = victim.take_out(evicted=reason)
            log.warning(
                "model unloaded: memory budget (LRU)",
                model=victim.name,
                versions=[v.version for v in versions],
                bytes=candidate.byte_size,
                idle_seconds=round(now - candidate.last_used, 3),
                for_model=load.entry.name,
                for_version=load.number,
                needed_bytes=load.needed,
                in_use_bytes=in_use,
                budget_bytes=self.bytes,
            )
            for version in versions:
                if self._metrics is not None:
                    self._metrics.evictions.labels(victim.name, version.version).inc()
                retiring.append(self._live.retire(victim, version))
        return retiring
