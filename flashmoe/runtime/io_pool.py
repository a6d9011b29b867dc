"""A pool of reader threads doing N-way split preads straight into slot memory.

Reads release the GIL, so they overlap with MLX evaluation in the MLX thread.
"""
from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import structlog

from flashmoe.runtime.platform_io import page_size
from flashmoe.errors import ExpertReadError

PAGE = page_size()  # split cuts and O_DIRECT alignment follow the OS page
MIN_CHUNK = 64 * 1024
Reader = Callable[[int, list, int], int]  # (fd, [buffer], offset) -> bytes read, like os.preadv
RETRYABLE = (errno.EINTR, errno.EIO, errno.EAGAIN)
RETRY_BACKOFF_S = 0.002  # doubled per failure, capped at 0.1 s: a flaky disk gets a moment


def _io_logger() -> structlog.typing.BindableLogger:
    """flashmoe's configured logger; unconfigured structlog would print to stdout (the text's)."""
    if structlog.is_configured():
        return structlog.get_logger("flashmoe.io")
    render = structlog.processors.KeyValueRenderer(key_order=["event"])
    return structlog.wrap_logger(logging.getLogger("flashmoe.io"), processors=[render])


@dataclass(frozen=True, slots=True)
class ReadLabel:
    """What a read is for; formatted only when a message needs it, not on every read."""

    layer: int
    expert: int
    part: str
    file: str

    def __str__(self) -> str:
        return f"layer {self.layer} expert {self.expert} {self.part} ({self.file})"


@dataclass(frozen=True, slots=True)
class ReadJob:
    """Read `dest.nbytes` bytes of file `fd` at `offset` into the writable `dest` view."""

    fd: int
    offset: int
    dest: np.ndarray  # 1-D uint8 view into a slot array
    what: str | ReadLabel  # for messages: "layer 3 expert 17 down_proj.weight (file)"


def split_job(job: ReadJob, n: int) -> list[ReadJob]:
    """Cut one read into ≤ n chunks whose inner boundaries fall on page-aligned file offsets.

    Chunks stay ≥ MIN_CHUNK: splitting a 128 KiB scales tensor 8 ways costs more in
    thread hand-offs than it gains in queue depth."""
    size = job.dest.nbytes
    n = min(n, max(1, size // MIN_CHUNK))
    if n <= 1 or size <= PAGE:
        return [job]
    step = -(-size // n)
    cuts = [0]
    for i in range(1, n):
        c = ((job.offset + i * step) // PAGE) * PAGE - job.offset
        if cuts[-1] < c < size:
            cuts.append(c)
    cuts.append(size)
    return [ReadJob(job.fd, job.offset + a, job.dest[a:b], job.what) for a, b in zip(cuts, cuts[1:])]


class IOPool:
    """`threads` workers; each batch of jobs is split `split` ways and spread over them."""

    def __init__(self, threads: int, split: int, retries: int = 3,
                 reader: Reader | None = None, on_retry: Callable[..., None] | None = None) -> None:
        # threads, split and retries were range-checked with the engine's options
        self.threads, self.split, self.retries = threads, split, retries
        self._reader = reader or os.preadv
        self._on_retry = on_retry
        self._log = _io_logger()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flashmoe-io")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def read(self, jobs: list[ReadJob]) -> tuple[int, float]:
        """Run all jobs; return (bytes read, wall ms). Raises ExpertReadError on failure."""
        chunks = [c for j in jobs for c in split_job(j, self.split)]
        if not chunks:
            return 0, 0.0
        t0 = time.perf_counter()
        n = min(self.threads, len(chunks))
        batches = [chunks[i::n] for i in range(n)]
        loop = asyncio.get_running_loop()
        # each thread gets the caller's context, so log lines carry the run id
        futs = [loop.run_in_executor(self._pool, contextvars.copy_context().run,
                                     self._run_batch, b) for b in batches]
        done = await asyncio.gather(*futs, return_exceptions=True)
        errors = [d for d in done if isinstance(d, BaseException)]
        if errors:
            raise errors[0]
        return sum(done), (time.perf_counter() - t0) * 1e3

    def read_blocking(self, jobs: list[ReadJob]) -> int:
        """Synchronous variant (for tools and the raw-disk probe's reference path)."""
        return self._run_batch([c for j in jobs for c in split_job(j, self.split)])

    def _run_batch(self, batch: list[ReadJob]) -> int:
        return sum(self._read_fully(job) for job in batch)

    def _read_fully(self, job: ReadJob) -> int:
        """Complete short reads; retry transient errors a bounded number of times."""
        view, off, failures = job.dest, job.offset, 0
        while view.nbytes:
            try:
                got = self._reader(job.fd, [view], off)
            except OSError as e:
                failures += 1
                self._retry_or_raise(job, view.nbytes, off, e, failures)
                continue
            if got == 0:
                raise ExpertReadError(
                    f"reading {job.what}: file ended at offset {off} with {view.nbytes} bytes "
                    "still expected; the checkpoint file was truncated after it was opened")
            if not 0 < got <= view.nbytes:
                raise ExpertReadError(f"reading {job.what}: the reader returned {got} for a "
                                      f"{view.nbytes}-byte read; expected 0..{view.nbytes}")
            view, off = view[got:], off + got
        if failures:  # recovered: one warning per read, the retries are in the log
            self._log.warning("expert_read_recovered", what=str(job.what), attempts=failures + 1)
        return job.dest.nbytes

    def _retry_or_raise(self, job: ReadJob, left: int, off: int, e: OSError,
                        failures: int) -> None:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno not in RETRYABLE or failures > self.retries:
            raise ExpertReadError(
                f"reading {job.what} ({left} bytes at offset {off}) failed: {reason} after "
                f"{failures} attempt(s) ({self.retries} retries allowed); the disk or file is faulty; "
                "no token was computed from partial bytes") from None
        self._log.info("expert_read_retried", what=str(job.what), offset=off, errno=e.errno,
                       error=reason, attempt=failures)
        if self._on_retry:
            self._on_retry(what=str(job.what), offset=off, errno=e.errno, attempt=failures)
        time.sleep(min(RETRY_BACKOFF_S * 2 ** (failures - 1), 0.1))
