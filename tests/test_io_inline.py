"""A small read batch is first tried in the caller's thread with RWF_NOWAIT (io_pool.INLINE_BYTES):
what the page cache holds is copied there, the rest (a miss, or the tail of a partly cached
range) goes to the reader threads; the bytes are the file's either way."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from flashmoe.runtime import io_pool
from flashmoe.runtime.io_pool import IOPool, ReadJob

pytestmark = pytest.mark.skipif(not io_pool.NOWAIT, reason="no RWF_NOWAIT on this platform")
SIZE = 64 * 4096  # the `blob` fixture (conftest) holds 4 of these


def jobs_for(fd: int, ranges: list[tuple[int, int]]) -> list[ReadJob]:
    out = []
    for off, n in ranges:
        dest = np.zeros(n, np.uint8)
        a, b = dest[: n // 3], dest[n // 3:]  # two views: a scatter read, as coalesce makes
        out.append(ReadJob(fd, off, a, f"range at {off}", (b,)))
    return out


def landed(jobs: list[ReadJob]) -> list[np.ndarray]:
    return [np.concatenate(j.views) for j in jobs]


class Spy:
    """os.preadv that records the flags of each call and can refuse or shorten NOWAIT ones."""

    def __init__(self, refuse=(), short=()) -> None:
        self.refuse, self.short, self.calls = set(refuse), set(short), []
        self.real = os.preadv

    def __call__(self, fd, views, off, flags=0):
        self.calls.append((off, flags))
        if flags and off in self.refuse:
            raise BlockingIOError(errno.EAGAIN, "not cached")
        if flags and off in self.short:
            return self.real(fd, [views[0][:4096]], off, flags)  # a partly cached range
        return self.real(fd, views, off, flags)


async def test_a_cached_small_batch_is_read_in_the_callers_thread(blob, monkeypatch):
    fd, data = blob
    ranges = [(0, SIZE), (2 * SIZE + 100, SIZE - 100), (3 * SIZE, 5000)]
    pool = IOPool(4, 3)
    spy = Spy()
    monkeypatch.setattr(io_pool.os, "preadv", spy)
    monkeypatch.setattr(pool, "_all", lambda batches: pytest.fail("reader threads were used"))
    jobs = jobs_for(fd, ranges)
    got, ms = await pool.read(jobs)
    pool.close()
    assert got == sum(n for _, n in ranges) and ms >= 0
    assert [f for _, f in spy.calls] == [io_pool.NOWAIT] * len(ranges)
    for (off, n), out in zip(ranges, landed(jobs)):
        assert np.array_equal(out, data[off:off + n])


async def test_misses_and_partly_cached_ranges_finish_in_the_reader_threads(blob, monkeypatch):
    fd, data = blob
    ranges = [(0, SIZE), (SIZE, SIZE), (2 * SIZE, SIZE)]
    spy = Spy(refuse={0}, short={SIZE})
    monkeypatch.setattr(io_pool.os, "preadv", spy)
    pool = IOPool(2, 2)
    jobs = jobs_for(fd, ranges)
    got, _ = await pool.read(jobs)
    pool.close()
    assert got == 3 * SIZE
    for (off, n), out in zip(ranges, landed(jobs)):
        assert np.array_equal(out, data[off:off + n])
    blocking = sorted(off for off, f in spy.calls if not f)
    assert blocking[0] == 0 and SIZE + 4096 in blocking  # the miss, and the partial's tail
    assert not any(SIZE * 2 <= off < SIZE * 3 for off in blocking)  # the cached one: inline


async def test_a_large_batch_or_an_injected_reader_skips_the_inline_pass(blob, monkeypatch):
    fd, data = blob
    spy = Spy()
    monkeypatch.setattr(io_pool.os, "preadv", spy)
    for pool in (IOPool(2, 1, inline_bytes=SIZE), IOPool(2, 1, reader=spy)):
        spy.calls.clear()
        jobs = jobs_for(fd, [(0, SIZE), (SIZE, SIZE)])  # 2 * SIZE > SIZE, or a test's reader
        assert (await pool.read(jobs))[0] == 2 * SIZE
        pool.close()
        assert spy.calls and all(f == 0 for _, f in spy.calls)
        assert np.array_equal(np.concatenate(landed(jobs)), data[:2 * SIZE])


async def test_an_inline_error_is_reported_by_the_blocking_read(blob, monkeypatch):
    """A NOWAIT failure other than EAGAIN is not swallowed: the blocking read meets it again."""
    fd, _ = blob

    def broken(fd_, views, off, flags=0):
        raise OSError(errno.EBADF, "bad descriptor")

    monkeypatch.setattr(io_pool.os, "preadv", broken)
    pool = IOPool(1, 1, retries=0)
    from flashmoe.errors import ExpertReadError

    with pytest.raises(ExpertReadError, match="Bad file descriptor|bad descriptor"):
        await pool.read(jobs_for(fd, [(0, 4096)]))
    pool.close()
