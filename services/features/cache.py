"""The in-process tier: a TTL + LRU cache of Redis values, bounded in bytes.

Each entry has two clocks. `fresh_until` (monotonic) is when it should be re-read from
Redis; a stale entry is kept, because it is still the best answer while Redis is down.
`expires_at` (wall clock) is the view's per-entity TTL: past it the value must never be
served again, so get() drops it. Absent entities are cached too (value None), so unknown
ids do not cost a Redis read each time.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

# Rough per-entry overhead (key string, tuple, OrderedDict node) so the bound means memory.
ENTRY_OVERHEAD_BYTES = 160


class Entry(NamedTuple):
    value: bytes | None
    fresh_until: float  # monotonic seconds
    expires_at: float  # unix seconds; inf: never
    size: int


class LocalCache:
    def __init__(
        self,
        max_bytes: int,
        ttl_seconds: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._monotonic = monotonic
        self._wall = wall
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        """The entry, fresh or stale, unless absent or past its TTL; marks it recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._wall():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def get_many(self, keys: list[str]) -> list[Entry | None]:
        """get() for each key, in one call (the request path reads hundreds at a time)."""
        entries, touch, now = self._entries, self._entries.move_to_end, self._wall()
        found: list[Entry | None] = []
        append = found.append
        for key in keys:
            entry = entries.get(key)
            if entry is not None:
                if entry.expires_at <= now:
                    self._drop(key)
                    entry = None
                else:
                    touch(key)
            append(entry)
        return found

    def is_fresh(self, entry: Entry) -> bool:
        return entry.fresh_until > self._monotonic()

    def put(self, key: str, value: bytes | None, expires_at: float = math.inf) -> None:
        if not self.enabled:
            return
        size = len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = Entry(value, self._monotonic() + self.ttl_seconds, expires_at, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
