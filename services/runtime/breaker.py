"""A circuit breaker in front of a dependency that may go away (Redis).

After `failure_threshold` consecutive failures it opens: callers stop calling the
dependency and answer without it at once, so an outage costs requests no timeouts. While
open, one probe per `probe_interval` may try it; the first success closes it again.

Two ways to probe: features runs a background loop that claims `probe_due()` and PINGs
Redis, so requests themselves never probe; ranking has no such loop and lets one request
per interval through as the trial (`admit()`).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        probe_interval: float = 0.5,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.probe_interval = probe_interval
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None
        self._last_probe = 0.0

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """Whether a request may call Redis now."""
        return self._opened_at is None

    def admit(self) -> bool:
        """Whether this call may go to the dependency: closed, or open and this call is the
        one trial of the current probe interval (claimed)."""
        return self.allow() or self.probe_due()

    def record_success(self) -> bool:
        """Record a success; True when it closes an open breaker."""
        self._failures = 0
        if self._opened_at is None:
            return False
        self._opened_at = None
        if self._on_change:
            self._on_change(False)
        return True

    def record_failure(self) -> None:
        self._failures += 1
        if self._opened_at is None and self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._last_probe = self._opened_at
            if self._on_change:
                self._on_change(True)

    def probe_due(self) -> bool:
        """Open and the last probe is at least probe_interval old; claims the probe slot."""
        if self._opened_at is None:
            return False
        now = self._clock()
        if now - self._last_probe < self.probe_interval:
            return False
        self._last_probe = now
        return True
