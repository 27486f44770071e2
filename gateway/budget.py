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
from typing import Annotated

import pydantic
from pydantic import Field

STAGES = ("retrieval", "features", "scoring", "ranking")
# The whole-request budget of a caller that sets no deadline: the gateway's default
# (GATEWAY_TIMEOUT_SECONDS) and the deadline the edge gives such callers (Envoy's
# default grpc-timeout, infermesh/envoy/resilience.py), whose per-try timeouts derive
# from the stage budgets of this deadline.
DEFAULT_DEADLINE_SECONDS = 2.0

# Declared once, for StageBudgets and for the GATEWAY_*_BUDGET settings that fill it.
BudgetWeight = Annotated[float, Field(gt=0)]
ReserveShare = Annotated[float, Field(ge=0, lt=1)]


@pydantic.dataclasses.dataclass(frozen=True)
class StageBudgets:
    retrieval: BudgetWeight = 0.15
    features: BudgetWeight = 0.25
    scoring: BudgetWeight = 0.35
    ranking: BudgetWeight = 0.15
    reserve: ReserveShare = 0.10

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

    def shortest(self, stage: str, total: float) -> float:
        """The least time `stage` gets in a request of `total` seconds, with or without
        retrieval (a request that brings candidates gives retrieval's share to the others)."""
        plans = (STAGES, STAGES[1:])
        return min(self.plan(total, stages).stages[stage] for stages in plans if stage in stages)


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
