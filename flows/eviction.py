"""Caps on keyed state that hostile input could grow without bound.

:class:`OldestFirst` keeps, for the keys of one collection, the event time each was last active,
and names the least recently active key (ties: the smallest key) when the collection is over its
cap. Event time, not arrival order, so the key evicted does not depend on how source partitions
interleave. A lazy heap: touching a key pushes a new entry (O(log n)); stale entries are skipped
when popped and compacted away once they outnumber the live ones.

>>> lru = OldestFirst()
>>> for key, ts in [("a", 5), ("b", 3), ("c", 9), ("b", 7)]:
...     lru.touch(key, ts)
>>> lru.pop_oldest(), lru.pop_oldest(), len(lru)
('a', 'b', 1)
>>> lru.discard("c"); lru.pop_oldest() is None
True
"""
from __future__ import annotations

import heapq


class OldestFirst:
    __slots__ = ("last", "heap")

    def __init__(self):
        self.last: dict[str, int] = {}  # key -> event time it was last active
        self.heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self.last)

    def touch(self, key: str, ts: int) -> None:
        previous = self.last.get(key)
        if previous is not None and previous >= ts:
            return  # an older event of an active key changes nothing
        self.last[key] = ts
        heapq.heappush(self.heap, (ts, key))
        if len(self.heap) > 2 * len(self.last) + 64:
            self.heap = [(t, k) for k, t in self.last.items()]
            heapq.heapify(self.heap)

    def discard(self, key: str) -> None:
        self.last.pop(key, None)

    def purge(self, key: str) -> None:
        """Forget a key with its heap entries (erasure: no stale entry may keep the id)."""
        self.last.pop(key, None)
        if any(k == key for _, k in self.heap):
            self.heap = [e for e in self.heap if e[1] != key]
            heapq.heapify(self.heap)

    def pop_older_than(self, ts: int) -> str | None:
        """Remove and return a key last active before ``ts``, oldest first (None: there is none)."""
        while self.heap and self.heap[0][0] < ts:
            t, key = heapq.heappop(self.heap)
            if self.last.get(key) == t:
                del self.last[key]
                return key
        return None

    def pop_oldest(self) -> str | None:
        """Remove and return the least recently active key (None when empty)."""
        while self.heap:
            ts, key = heapq.heappop(self.heap)
            if self.last.get(key) == ts:
                del self.last[key]
                return key
        return None
