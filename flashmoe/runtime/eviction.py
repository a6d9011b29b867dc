"""Which unpinned slot a miss overwrites, without scanning every slot.

The decisions are the ones a full scan in recency order would make: an empty slot first (the
least recently granted one), else the least recently granted unpinned slot (lru, none), or the
unpinned slot whose expert was granted least often, ties to the least recent (lfu).

Recency is an OrderedDict of every slot, moved to the end on each grant: the least recently
granted unpinned slot is found after skipping only pinned slots at the front, so the cost is
bounded by the slots in flight, not by the pool's size. Empty slots and LFU order are heaps
of (key, stamp, slot) with lazy deletion: an entry is stale once its slot was granted again.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

COMPACT_FACTOR = 2  # rebuild a heap once stale entries outnumber the slots


class Eviction:
    """Recency, empty-slot and frequency order of `n` slots; the pool reports every change."""

    def __init__(self, n: int, policy: str) -> None:
        self.n, self.lfu = n, policy == "lfu"
        self._recency: OrderedDict[int, None] = OrderedDict((s, None) for s in range(n))
        self._stamp = list(range(-n, 0))  # grant order; initial slots in index order
        self._clock = 0
        self._empty: list[tuple[int, int]] = [(self._stamp[s], s) for s in range(n)]  # sorted
        self._rare: list[tuple[int, int, int]] = []  # lfu: (uses, stamp, slot)

    def granted(self, s: int) -> None:
        """`s` was pinned by a grant: it becomes the most recent."""
        self._recency.move_to_end(s)
        self._stamp[s] = self._clock
        self._clock += 1

    def unpinned(self, s: int, empty: bool, uses: int) -> None:
        """`s` has no pins left; `uses` counts the grants of the expert it holds."""
        if empty:
            _push(self._empty, (self._stamp[s], s), self.n)
        elif self.lfu:
            _push(self._rare, (uses, self._stamp[s], s), self.n)

    def oldest(self):
        """Slots from the least recently granted on (lru's eviction order, pinned included)."""
        return iter(self._recency)

    def victim(self, pins: list[int], owner: list) -> int:
        """The slot a miss overwrites; the caller guarantees one is unpinned."""
        s = self._pop_valid(self._empty, pins, owner, empty=True)
        if s is not None:
            return s
        if self.lfu:
            s = self._pop_valid(self._rare, pins, owner, empty=False)
            assert s is not None, "an unpinned slot always has a heap entry"
            return s
        for s in self._recency:  # only pinned slots are skipped
            if pins[s] == 0:
                return s
        raise AssertionError("caller must chunk to the free slots")

    def _pop_valid(self, heap: list, pins: list[int], owner: list, empty: bool) -> int | None:
        while heap:
            entry = heap[0]
            s = entry[-1]
            if pins[s] == 0 and (owner[s] is None) == empty and entry[-2] == self._stamp[s]:
                return s  # popped by the grant that pins it (granted() makes it stale)
            heapq.heappop(heap)
        return None


def _push(heap: list, entry: tuple, n: int) -> None:
    heapq.heappush(heap, entry)
    if len(heap) > COMPACT_FACTOR * n + 64:
        # keep the newest entry of each slot; stale ones would be skipped on pop anyway
        newest: dict[int, tuple] = {}
        for e in heap:
            if e[-1] not in newest or e[-2] > newest[e[-1]][-2]:
                newest[e[-1]] = e
        heap[:] = list(newest.values())
        heapq.heapify(heap)
