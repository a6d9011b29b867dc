"""Adjacent expert ranges read as one scatter preadv land byte for byte where they belong."""
from __future__ import annotations

import os

import numpy as np
import pytest

from flashmoe.runtime.io_pool import PAGE, IOPool, ReadJob, coalesce, split_job


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def _jobs(fd: int, ranges: list[tuple[int, int]]) -> tuple[list[ReadJob], list[np.ndarray]]:
    dests = [np.zeros(n, dtype=np.uint8) for _, n in ranges]
    return [ReadJob(fd, off, d, f"r{i}") for i, ((off, _), d) in enumerate(zip(ranges, dests))], dests


def test_touching_ranges_merge_and_gaps_do_not(blob):
    fd, _ = blob
    jobs, _ = _jobs(fd, [(5000, 100), (0, 5000), (5100, 7), (6000, 10)])
    merged = coalesce(jobs)
    assert [(j.offset, j.nbytes, len(j.views)) for j in merged] == [(0, 5107, 3), (6000, 10, 1)]
    assert coalesce(_jobs(fd + 1000, [(0, 10)])[0] + jobs)[0].fd == fd  # other files stay apart


@pytest.mark.parametrize("split", [1, 2, 3, 8])
@pytest.mark.parametrize("short", [False, True])
def test_merged_split_and_short_reads_land_exactly(blob, split, short):
    fd, data = blob
    ranges = [(0, 70_000), (70_000, 16_384), (86_384, 3), (86_387, 130_001), (250_000, 9)]
    jobs, dests = _jobs(fd, ranges)
    merged = coalesce(jobs)
    assert len(merged) == 2
    chunks = [c for j in merged for c in split_job(j, split)]
    assert sum(c.nbytes for c in chunks) == sum(n for _, n in ranges)
    assert all(c.offset % PAGE == 0 for j in merged for c in split_job(j, split)[1:])
    # a reader that returns at most 1,000 bytes per call crosses view boundaries mid-read
    def reader(f, bufs, off):
        return (os.preadv(f, bufs, off) if not short else
                os.preadv(f, [memoryview(bufs[0])[:1000]], off))
    assert IOPool(3, split, reader=reader).read_blocking(merged) == sum(n for _, n in ranges)
    for (off, n), d in zip(ranges, dests):
        assert d.tobytes() == data[off:off + n].tobytes()


def test_merged_reads_stay_within_the_limit(blob):
    fd, _ = blob
    jobs, _ = _jobs(fd, [(0, 100), (100, 100), (200, 100), (300, 250)])
    assert [j.nbytes for j in coalesce(jobs, limit=250)] == [200, 100, 250]
