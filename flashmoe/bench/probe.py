"""What the disk can do: raw parallel preads over a recorded expert-read trace, no MLX.

Also: dropping a file's cached pages (platform_io.evict) so a bench reads the disk.
"""
from __future__ import annotations

import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flashmoe.runtime.platform_io import evict

from flashmoe.runtime.fileio import pread_exact

Batch = Sequence[tuple[int, int, int]]  # (fd, offset, nbytes) read together by one fetch


@dataclass(frozen=True, slots=True)
class ProbeResult:
    bytes_read: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


def drop_page_cache(files: Sequence[Path]) -> str:
    """Evict the files' pages from the OS page cache (no root needed); returns the method."""
    return evict(files)


def probe(trace: Sequence[Batch], threads: int, before: Sequence[Batch] = ()) -> ProbeResult:
    """Replay every batch with `threads` threads, batch after batch, as the engine did.

    `before` is replayed first, untimed: the reads that preceded the timed ones in the
    engine's run (a cold repeat's prompt pass), so the page cache holds what it held then."""
    biggest = max((n for b in (*before, *trace) for _, _, n in b), default=0)
    # page-aligned (anonymous mmap), so O_DIRECT descriptors in the trace read as they did
    buffers = [mmap.mmap(-1, max(biggest, 4096)) for _ in range(threads)]
    total, elapsed = 0, 0.0
    with ThreadPoolExecutor(threads) as pool:
        for batch in before:
            list(pool.map(_read_group, _groups(batch, threads), buffers))
        for batch in trace:
            t0 = time.perf_counter()
            total += sum(pool.map(_read_group, _groups(batch, threads), buffers))
            elapsed += time.perf_counter() - t0
    return ProbeResult(total, elapsed)


def _groups(batch: Batch, threads: int) -> list[Batch]:
    return [batch[i::threads] for i in range(min(threads, len(batch)))]


def _read_group(group: Batch, buf: mmap.mmap) -> int:
    view, done = memoryview(buf), 0
    for fd, offset, nbytes in group:
        pread_exact(fd, view[:nbytes], offset, f"the probed file (fd {fd})")
        done += nbytes
    return done
