"""A read job's `then` (an O_DIRECT bounce row's copy into its slot) runs once, in the thread
that read the job's last byte, after every chunk of it is in: however io.split cut it, and
whether the page cache served it inline or a reader thread did."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from flashmoe.runtime.direct import DirectBounce
from flashmoe.runtime.io_pool import PAGE, IOPool, ReadJob, coalesce

SIZE = 64 * 4096  # the `blob` fixture (conftest) holds 4 of these


def watched(fd: int, off: int, n: int) -> tuple[ReadJob, list]:
    """A job whose `then` records what its destination held when it ran, and where."""
    dest, seen = np.zeros(n, np.uint8), []
    job = ReadJob(fd, off, dest, f"range at {off}",
                  then=lambda: seen.append((dest.copy(), threading.current_thread().name)))
    return job, seen


@pytest.mark.parametrize("split", [1, 3, 8])
@pytest.mark.parametrize("inline", [0, 1 << 30])
async def test_then_runs_once_after_every_chunk_is_in(blob, split, inline):
    fd, data = blob
    pool = IOPool(4, split, inline_bytes=inline)
    try:
        watches = [watched(fd, off, SIZE) for off in (0, 2 * SIZE + 100)]
        await pool.read([j for j, _ in watches])
    finally:
        pool.close()
    for (_, seen), off in zip(watches, (0, 2 * SIZE + 100)):
        assert len(seen) == 1, "then must run exactly once"
        assert np.array_equal(seen[0][0], data[off: off + SIZE]), "ran before the last chunk"


async def test_then_runs_in_a_reader_thread_when_the_read_is_not_inline(blob):
    fd, _ = blob
    pool = IOPool(2, 4, inline_bytes=0)
    try:
        job, seen = watched(fd, 0, SIZE)
        await pool.read([job])
    finally:
        pool.close()
    assert seen[0][1].startswith("flashmoe-io")  # overlaps the other reads, off the loop


def test_jobs_with_then_are_not_coalesced(blob):
    fd, _ = blob
    a, _ = watched(fd, 0, PAGE)
    b, _ = watched(fd, PAGE, PAGE)
    assert len(coalesce([a, b])) == 2


async def test_a_bounce_row_lands_in_its_slot_bytes(tmp_path):
    """DirectBounce's job reads the aligned superset and copies the part's bytes into the
    destination by itself (no copy step after the batch)."""
    data = np.random.default_rng(2).integers(0, 256, 8 * PAGE, dtype=np.uint8)
    f = tmp_path / "blob"
    f.write_bytes(data.tobytes())
    fd = os.open(f, os.O_RDONLY)
    bounce = DirectBounce([3 * PAGE + 17], 2)
    dest = np.zeros(3 * PAGE + 17, np.uint8)
    pool = IOPool(2, 2, inline_bytes=0)
    try:
        await pool.read([bounce.job(fd, PAGE + 5, dest, 1, 0, "part")])
    finally:
        pool.close()
        os.close(fd)
    assert np.array_equal(dest, data[PAGE + 5: PAGE + 5 + dest.nbytes])
