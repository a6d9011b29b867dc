"""The host-RAM tier behind the device slots (cache.host_budget_gb).

An expert evicted from the slots is demoted here (its file bytes copied out) instead of being
dropped; a miss that finds it here is promoted (copied back into its new slot) instead of
read from disk. The tiers are exclusive in capacity: an expert counts in the slots or here, so
their capacities add. But a promoted expert's row is not emptied: it is *kept* as a copy
until a demotion needs the room (kept rows go before any demoted one), so when that expert
leaves the slots again, as the two-tier cache's churn makes it do, its demotion is free: no
copy out, no wait for one before its slot is refilled (an expert's bytes are its file's: they
never change). The slot pool also *stashes* copies of the experts next in line for eviction
(stash(): clean-ahead), so that their demotions are free too. Least recently demoted goes
first when full. On CUDA builds the rows are
pinned host memory (cuda_copy.py) when the driver is there; elsewhere plain numpy memory,
which on Apple silicon only duplicates the page cache (its default there is 0).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

from flashmoe.runtime import cuda_copy
from flashmoe.runtime.cuda_copy import CudaCopy

Key = tuple[int, int]  # (layer, expert)
Alloc = Callable[[int], np.ndarray]  # nbytes -> writable 1-D uint8 buffer
# a slot's parts: numpy views, or (address, bytes) spans when the CUDA copy path moves them
Parts = list[np.ndarray] | cuda_copy.Spans


class HostTier:
    """`n` rows of one expert's file bytes (parts back to back, in `parts` order)."""

    def __init__(self, part_bytes: list[int], n: int, alloc: Alloc | None = None,
                 cuda: CudaCopy | None = None) -> None:
        self.n, self.row_bytes, self._cuda = n, sum(part_bytes), cuda
        self._cuts = np.cumsum([0, *part_bytes]).tolist()
        self._parts = [(a, b - a) for a, b in zip(self._cuts, self._cuts[1:])]  # (offset, bytes)
        raw = (alloc or _numpy_alloc)(max(n, 1) * self.row_bytes)
        self._rows = raw[: n * self.row_bytes].reshape(n, self.row_bytes)  # lazily backed
        self._base = cuda_copy.address(raw)
        self._table: OrderedDict[Key, int] = OrderedDict()  # least recently demoted first
        self._kept: OrderedDict[Key, int] = OrderedDict()  # promoted, copy still here
        self._free = list(range(n - 1, -1, -1))
        self.hits = self.demoted = self.dropped = self.kept = self.stashed = 0

    @property
    def nbytes(self) -> int:
        return self._rows.nbytes

    def __contains__(self, key: Key) -> bool:
        return key in self._table

    def has_copy(self, key: Key) -> bool:
        """An expert in the slots whose bytes are also here: its demotion copies nothing."""
        return key in self._kept

    def spare(self) -> int:
        """Rows not holding a demoted expert: free, or a kept copy."""
        return self.n - len(self._table)

    def demote(self, key: Key, views: Parts, slot: tuple = ()) -> None:
        """Keep a copy of an expert leaving the slots (`views`: its parts' file bytes, as
        (address, bytes) spans on the CUDA copy path; `slot` names the slot for its
        ordering)."""
        if self.n == 0:
            return
        if key in self._kept:  # its promotion left the bytes here: nothing to copy
            self._table[key] = self._kept.pop(key)
            self.kept += 1
            return
        if key in self._table:  # cannot happen with exclusive tiers; stay correct anyway
            self._free.append(self._table.pop(key))
        row = self._room()
        self._copy_out(row, views, slot)
        self._table[key] = row
        self.demoted += 1

    def stash(self, key: Key, views: Parts, slot: tuple = ()) -> bool:
        """Copy an expert that is still in the slots here ahead of its eviction, as a kept
        copy (its demotion is then free). Takes a free row or the oldest kept copy, never a
        demoted expert's; False when there is neither."""
        if key in self._kept:
            return True
        if self._free:
            row = self._free.pop()
        elif self._kept:
            row = self._kept.popitem(last=False)[1]
        else:
            return False
        self._copy_out(row, views, slot)
        self._kept[key] = row
        self.stashed += 1
        return True

    def _copy_out(self, row: int, views: Parts, slot: tuple) -> None:
        """`views`: the slot's parts, as (address, bytes) spans on the CUDA copy path (device
        to host on its own stream: no page migration), numpy views elsewhere."""
        if self._cuda is not None:
            cuda_copy.drain(self._cuda, slot, cuda_copy.copies(self._spans(row), views),
                            (id(self), row))
            return
        dst = self._rows[row]
        for v, a, b in zip(views, self._cuts, self._cuts[1:]):
            dst[a:b] = v.reshape(-1)

    def _spans(self, row: int) -> cuda_copy.Spans:
        return cuda_copy.row_spans(self._base, self.row_bytes, self._parts, row)

    def _room(self) -> int:
        """A row for a demotion: a free one, else the oldest kept copy (its expert is in the
        slots), else the least recently demoted expert's (dropped)."""
        if self._free:
            return self._free.pop()
        if self._kept:
            return self._kept.popitem(last=False)[1]
        self.dropped += 1
        return self._table.popitem(last=False)[1]

    def take(self, key: Key) -> int:
        """Reserve the expert's row for a promotion: it leaves the table but is not reused
        (a demotion in between must not overwrite it) until copy_back()."""
        return self._table.pop(key)

    def promote(self, key: Key, views: Parts, slot: tuple = ()) -> None:
        self.copy_back(key, self.take(key), views, slot)

    def copy_back(self, key: Key, row: int, views: Parts, slot: tuple = ()) -> None:
        """Copy `key`'s taken row into its new slot's `views`; the row stays as its kept copy.
        On CUDA the copy is enqueued (after the slot's drain and the row's demotion; a later
        demotion into the row waits for it): synchronise before reading the slot."""
        if self._cuda is not None:
            cuda_copy.fill(self._cuda, slot, cuda_copy.copies(views, self._spans(row)),
                           (id(self), row))
        else:
            src = self._rows[row]
            for v, a, b in zip(views, self._cuts, self._cuts[1:]):
                v.reshape(-1)[:] = src[a:b]
        self._kept[key] = row
        self.hits += 1

    def copy_with(self, cuda: CudaCopy | None) -> None:
        """The CUDA copy path when its pool's slots use it, else numpy copies (which land
        before the pool's own reads do)."""
        self._cuda = cuda

    def clear(self) -> None:
        self._free.extend([*self._table.values(), *self._kept.values()])
        self._table.clear()
        self._kept.clear()


def _numpy_alloc(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)
