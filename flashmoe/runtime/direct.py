"""O_DIRECT reads need aligned offsets, sizes and buffers: read each part's aligned superset
into a page-aligned bounce buffer, then copy the part's bytes into its slot (in the reading
thread, as soon as that read is in: the copies overlap the batch's other reads)."""
from __future__ import annotations

import mmap
from functools import partial

import numpy as np

from flashmoe.runtime.io_pool import PAGE, ReadJob



class DirectBounce:
    """`n` rows (one per expert read by a fetch), one aligned region per expert part
    (anonymous mmap: page-aligned). A fetch borrows one for its misses and gives it back once
    they are copied out (ExpertFetchStage): memory is one batch's bytes, not one per slot
    (8 GB of unswappable shared pages with the linux_cpu cache)."""

    def __init__(self, part_bytes: list[int], n: int) -> None:
        self.n = n
        sizes = [-(-nb // PAGE) * PAGE + PAGE for nb in part_bytes]  # + a page of misalignment
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._sizes = sizes
        per_slot = sum(sizes)
        self._mm = mmap.mmap(-1, max(n * per_slot, PAGE))
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)[: n * per_slot].reshape(n, per_slot)

    def job(self, fd: int, offset: int, dest: np.ndarray, row: int, part: int,
            what: str) -> ReadJob:
        """The aligned read of `dest`'s file bytes into bounce row `row`, copying them into
        `dest` once read."""
        start = offset // PAGE * PAGE
        end = -(-(offset + dest.nbytes) // PAGE) * PAGE
        region = self._buf[row, self._starts[part]: self._starts[part] + (end - start)]
        src = region[offset - start: offset - start + dest.nbytes]
        return ReadJob(fd, start, region, what, then=partial(_copy, src, dest))


def _copy(src: np.ndarray, dst: np.ndarray) -> None:
    dst[:] = src  # numpy releases the GIL for the copy: the other readers go on
