"""The in-process tier: Redis values cached per key space, bounded in bytes, read in bulk.

A key space is one view under one materialization (`<prefix>:<view key>:`, see layout.py).
Each has a resident table: entity id -> slot in numpy arrays holding the packed records,
their clocks and presence. A lookup of a thousand ids is then a few C-level passes (one
dict probe per id, made in C; the rest array operations), not Python work per id: it is
the warm path of every read.

Each entry has two clocks. `fresh_until` (monotonic) is when it should be re-read from
Redis; a stale entry is kept, because it is still the best answer while Redis is down.
`expires_at` (wall clock) is the view's per-entity TTL: past it the value must never be
served again, so a lookup drops it. Absent entities are cached too (present False), so
unknown ids do not cost a Redis read each time.

Eviction is CLOCK (second chance), an approximation of LRU that costs a lookup one
vectorised store: a lookup sets its entries' reference bits; when a put would pass the byte
bound, a hand sweeps the slots of every table in turn, clearing set bits and evicting the
entries whose bit was already clear, until the new entries fit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

import numpy as np

# Rough per-entry overhead (the id string, its dict entry, the slot's clocks and flags) so
# the bound means memory; each entry also counts its id's length and its record's size.
ENTRY_OVERHEAD_BYTES = 160
# A table starts this small and doubles as it fills (never past what the bound can hold).
_FIRST_SLOTS = 256
# The hand examines at most this many slots per vectorised step.
_SWEEP_WINDOW = 4096


class Lookup(NamedTuple):
    """What the cache holds for each id of a lookup, in the lookup's order. Copies: later
    puts and evictions do not change them."""

    records: np.ndarray  # the table's record dtype [n]; meaningless where not present
    live: np.ndarray  # bool [n]: an entry within its TTL, fresh or stale
    fresh: np.ndarray  # bool [n]: live and before fresh_until (needs no Redis read)
    present: np.ndarray  # bool [n]: live and the entity exists (False: cached as absent)
    expires_at: np.ndarray  # float64 [n]: the entry's TTL (unix seconds) where live

    @classmethod
    def missing(cls, n: int, dtype: np.dtype) -> Lookup:
        return cls(np.zeros(n, dtype), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n))


class _Table:
    """One key space: entity id -> slot, and per slot the entry's record, clocks and size."""

    def __init__(self, dtype: np.dtype, max_slots: int) -> None:
        self.dtype = dtype
        self.max_slots = max_slots  # what the byte bound can hold; growth stops there
        self.index: dict[str, int] = {}
        self.free: list[int] = []  # free slots, popped from the end
        self.hand = 0  # CLOCK: the next slot to examine
        self.ids = np.empty(0, object)  # slot -> entity id (None: free), for eviction
        self.records = np.zeros(0, dtype)
        self.present = np.zeros(0, bool)
        self.fresh_until = np.zeros(0)  # monotonic seconds
        self.expires_at = np.zeros(0)  # unix seconds; inf: never
        self.size = np.zeros(0, np.int64)  # bytes the entry counts; 0: a free slot
        self.ref = np.zeros(0, bool)  # CLOCK reference bit: used since the hand last passed
        self._grow(min(_FIRST_SLOTS, max_slots))

    @property
    def capacity(self) -> int:
        return len(self.size)

    def find(self, ids: Sequence[str]) -> np.ndarray:
        """Each id's slot, -1 where absent: one C-level pass over the ids (itemgetter first:
        a quarter faster than map() when every id is there, as on the warm path)."""
        try:
            return np.array(itemgetter(*ids)(self.index), np.intp, ndmin=1)
        except KeyError:
            return np.fromiter(map(self.index.get, ids, repeat(-1)), np.intp, len(ids))

    def take(self, ids: list[str]) -> np.ndarray:
        """Free slots for these new ids, indexed under them."""
        k = len(ids)
        if k > len(self.free):
            self._grow(max(min(2 * self.capacity, self.max_slots), self.capacity + k - len(self.free)))
        slots = self.free[-k:]
        del self.free[-k:]
        slots.reverse()  # lowest slot first: the hand meets entries in the order they came
        self.index.update(zip(ids, slots, strict=False))
        return np.asarray(slots, np.intp)

    def release(self, slots: np.ndarray) -> int:
        """Free these occupied slots (each once); the bytes they counted."""
        if not len(slots):
            return 0
        deque(map(self.index.pop, self.ids[slots].tolist()), maxlen=0)  # C-level: no loop per id
        freed = int(self.size[slots].sum())
        self.ids[slots] = None
        self.size[slots] = 0
        self.ref[slots] = False
        self.free.extend(slots.tolist())
        return freed

    def sweep(self, need: int) -> tuple[int, int]:
        """CLOCK from the hand towards the end of the table: evict unreferenced entries and
        clear the reference bits passed, until `need` bytes are freed or the hand wraps to
        slot 0. (bytes freed, entries evicted)."""
        freed = evicted = 0
        while freed < need:
            start = self.hand
            window = slice(start, min(start + _SWEEP_WINDOW, self.capacity))
            victims = np.where(self.ref[window], 0, self.size[window])
            total = np.cumsum(victims)
            stop = int(np.searchsorted(total, need - freed))  # the victim that frees enough
            end = start + min(stop + 1, len(total))
            self.ref[start:end] = False
            chosen = np.flatnonzero(victims[: end - start]) + start
            freed += self.release(chosen)
            evicted += len(chosen)
            self.hand = end % self.capacity
            if self.hand == 0:
                break
        return freed, evicted

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        for name in ("ids", "records", "present", "fresh_until", "expires_at", "size", "ref"):
            array = getattr(self, name)
            grown = np.zeros(capacity, array.dtype) if array.dtype != object else np.full(capacity, None, object)
            grown[:old] = array
            setattr(self, name, grown)
        self.free.extend(range(capacity - 1, old - 1, -1))


class LocalCache:
    """Every key space's entries within `max_bytes` together, each fresh for `ttl_seconds`."""

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
        self._tables: dict[str, _Table] = {}
        self._turn = 0  # CLOCK: which table the hand is in
        self.bytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        # tuple() copies in C: the metrics thread may ask while the event loop adds a table.
        return sum(len(table.index) for table in tuple(self._tables.values()))

    def lookup(self, head: str, dtype: np.dtype, ids: Sequence[str]) -> Lookup:
        """The entries of these ids in key space `head`, fresh or stale; drops the ones past
        their TTL and marks the rest used. O(1) Python work in len(ids)."""
        table = self._tables.get(head)
        if table is None or table.dtype != dtype or not len(ids):
            return Lookup.missing(len(ids), dtype)
        slots = table.find(ids)
        found = slots >= 0
        at = slots if found.all() else np.where(found, slots, 0)
        expires_at = table.expires_at[at]
        live = found & (expires_at > self._wall())
        expired = found & ~live
        if expired.any():
            self.bytes -= table.release(np.unique(slots[expired]))
        table.ref[at[live]] = True
        fresh = live & (table.fresh_until[at] > self._monotonic())
        # take(), not records[at]: fancy indexing copies structured records several times slower.
        return Lookup(table.records.take(at), live, fresh, live & table.present[at], expires_at)

    def put_many(
        self, head: str, ids: Sequence[str], records: np.ndarray, present: np.ndarray, expires_at: np.ndarray
    ) -> None:
        """Cache these entries of key space `head`, fresh from now; evicts to stay within the
        bound. `records` [n] of the view's record dtype; absent entities: present False."""
        if not self.enabled or not len(ids):
            return
        ids, records, present, expires_at = _last_of_each(ids, records, present, expires_at)
        table = self._table(head, records.dtype)
        sizes = np.fromiter(map(len, ids), np.int64, len(ids)) + (records.dtype.itemsize + ENTRY_OVERHEAD_BYTES)
        slots = table.find(ids)
        old = np.flatnonzero(slots >= 0)
        # Replacements first (same id, same size: no bytes change), so eviction cannot free
        # a slot this put is about to write. (take(): fancy indexing is slow on records.)
        self._write(table, slots[old], records.take(old), present[old], expires_at[old], sizes[old])
        new = np.flatnonzero(slots < 0)
        new = new[np.cumsum(sizes[new]) <= self.max_bytes]  # what cannot fit even alone stays out
        if not len(new):
            return
        need = self.bytes + int(sizes[new].sum()) - self.max_bytes
        if need > 0:
            self._evict(need, keep=table)
        new_ids = np.array(ids, object)[new]
        slots = table.take(new_ids.tolist())
        table.ids[slots] = new_ids
        self._write(table, slots, records.take(new), present[new], expires_at[new], sizes[new])
        self.bytes += int(sizes[new].sum())

    def drop(self, head: str) -> None:
        """Forget key space `head` (a materialization no longer served)."""
        table = self._tables.pop(head, None)
        if table is not None:
            self.bytes -= int(table.size.sum())

    def clear(self) -> None:
        self._tables.clear()
        self.bytes = 0

    def _table(self, head: str, dtype: np.dtype) -> _Table:
        table = self._tables.get(head)
        if table is None or table.dtype != dtype:
            self.drop(head)
            max_slots = self.max_bytes // (dtype.itemsize + ENTRY_OVERHEAD_BYTES) + 1
            table = self._tables[head] = _Table(dtype, max_slots)
        return table

    def _write(
        self,
        table: _Table,
        slots: np.ndarray,
        records: np.ndarray,
        present: np.ndarray,
        expires_at: np.ndarray,
        sizes: np.ndarray,
    ) -> None:
        np.put(table.records, slots, records)  # (several times faster than records[slots] = for records)
        table.present[slots] = present
        table.fresh_until[slots] = self._monotonic() + self.ttl_seconds
        table.expires_at[slots] = expires_at
        table.size[slots] = sizes
        table.ref[slots] = True  # a new entry counts as just used, as LRU would have it

    def _evict(self, need: int, keep: _Table) -> None:
        """Sweep the tables in turn until `need` bytes are freed (two turns free everything);
        tables left empty go, except `keep` (the one being written)."""
        while need > 0 and self.bytes > 0:
            tables = list(self._tables.values())
            table = tables[self._turn % len(tables)]
            freed, evicted = table.sweep(need)
            self.bytes -= freed
            self.evictions += evicted
            need -= freed
            if table.hand == 0:
                self._turn += 1
        for head in [h for h, t in self._tables.items() if not t.index and t is not keep]:
            del self._tables[head]


def _last_of_each(
    ids: Sequence[str], records: np.ndarray, present: np.ndarray, expires_at: np.ndarray
) -> tuple[Sequence[str], np.ndarray, np.ndarray, np.ndarray]:
    """The entries with each id once (its last value), so no id takes two slots."""
    last = dict(zip(ids, range(len(ids)), strict=False))
    if len(last) == len(ids):
        return ids, records, present, expires_at
    pick = np.fromiter(last.values(), np.intp, len(last))
    return list(last), records.take(pick), present[pick], expires_at[pick]
