"""One request deadline split into per-stage budgets.

Each stage has a weight (GATEWAY_<STAGE>_BUDGET) and a share of the deadline is kept back
(GATEWAY_FALLBACK_RESERVE) for the fallbacks and for writing the response. The weights are
normalised over the stages a request runs, so a request that brings its own candidates
(no retrieval) gives retrieval's share to the others. A stage call gets the smaller of its
budget and what is left of the deadline after the reserve: a slow stage can use its own
share but never its successors', and a stage that has a fallback always leaves time to run
it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.runtime.settings import SettingsError

STAGES = ("retrieval", "features", "scoring", "ranking")


@dataclass(frozen=True)
class StageBudgets:
    retrieval: float = 0.15
    features: float = 0.25
    scoring: float = 0.35
    ranking: float = 0.15
    reserve: float = 0.10

    def __post_init__(self) -> None:
        for stage in STAGES:
            if not getattr(self, stage) > 0:
                raise SettingsError(f"GATEWAY_{stage.upper()}_BUDGET must be > 0, got {getattr(self, stage)}")
        if not 0 <= self.reserve < 1:
            raise SettingsError(f"GATEWAY_FALLBACK_RESERVE must be within [0, 1), got {self.reserve}")

    def plan(self, total: float, stages: Sequence[str]) -> Budget:
        """Seconds per stage for a request of `total` seconds running `stages`."""
        weights = {stage: getattr(self, stage) for stage in stages}
        share = sum(weights.values())
        # The reserve is a fraction of the whole deadline; the stages split the rest.
        spendable = total * (1.0 - self.reserve)
        return Budget(
            end=time.monotonic() + total,
            reserve=total * self.reserve,
            stages={stage: spendable * weight / share for stage, weight in weights.items()},
        )


@dataclass(frozen=True)
class Budget:
    end: float  # time.monotonic() at the request's deadline
    reserve: float  # seconds kept for fallbacks and the response
    stages: dict[str, float]

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, stage: str) -> float:
        """What the stage's call may take now: <= 0 means it must not be called."""
        return min(self.stages[stage], self.remaining() - self.reserve)
