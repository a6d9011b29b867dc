"""A pool of reader threads doing N-way split preads straight into slot memory.

Reads release the GIL, so they overlap with MLX evaluation in the MLX thread.
"""
from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
# A batch this small is first read in the caller's thread with RWF_NOWAIT: what the page cache
# holds is copied with no thread hand-off, and the rest has its disk reads started at once
INLINE_BYTES = 4 * 2**20
NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14; 0 elsewhere: no inline pass


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
    """Read the bytes of file `fd` at `offset` into the writable `dest` view, then (a job
    coalesced from adjacent ranges) straight on into each view of `more`: one preadv."""

    fd: int
    offset: int
    dest: np.ndarray  # 1-D uint8 view into a slot array
    what: str | ReadLabel  # for messages: "layer 3 expert 17 down_proj.weight (file)"
    more: tuple[np.ndarray, ...] = ()  # the file bytes right after dest's, in order
    # run in the reading thread once every byte of the job is in (an O_DIRECT bounce row's
    # copy into its slot: it overlaps the other reads of the batch instead of following them)
    then: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)  # bytes to read, all views

    def __post_init__(self) -> None:  # asked for several times per read: computed once
        n = self.dest.nbytes
        for v in self.more:
            n += v.nbytes
        object.__setattr__(self, "nbytes", n)

    @property
    def views(self) -> list[np.ndarray]:
        return [self.dest, *self.more]


def coalesce(jobs: list[ReadJob], limit: int | None = None) -> list[ReadJob]:
    """Merge jobs whose file ranges touch (same file, one ending where the next starts) into
    one scatter read of at most `limit` bytes: fewer requests where the layout allows (a
    packed expert's small scales and biases, neighbouring experts of one tensor). The fetch
    stage passes its largest part, so no read grows past what io.split was tuned on.
    Order: by file and offset."""
    out: list[ReadJob] = []
    for job in sorted(jobs, key=lambda j: (j.fd, j.offset)):
        last = out[-1] if out else None
        if (last is not None and last.fd == job.fd and last.offset + last.nbytes == job.offset
                and last.then is None and job.then is None
                and (limit is None or last.nbytes + job.nbytes <= limit)):
            out[-1] = ReadJob(last.fd, last.offset, last.dest, last.what,
                              (*last.more, *job.views))
        else:
            out.append(job)
    return out


def split_job(job: ReadJob, n: int) -> list[ReadJob]:
    """Cut one read into ≤ n chunks whose inner boundaries fall on page-aligned file offsets.

    Chunks stay ≥ MIN_CHUNK: splitting a 128 KiB scales tensor 8 ways costs more in
    thread hand-offs than it gains in queue depth."""
    size = job.nbytes
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
    views = job.views
    return [_chunk(job, views, a, b) for a, b in zip(cuts, cuts[1:])]


def _split(job: ReadJob, n: int) -> list[ReadJob]:
    """split_job, and a job's `then` run once, by whichever thread reads its last chunk."""
    chunks = split_job(job, n)
    if job.then is None:
        return chunks
    if len(chunks) == 1:  # uncut (a one-chunk cut reads the same range): the job keeps it
        return [job]
    left, lock = [len(chunks)], threading.Lock()

    def one_done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            job.then()

    return [replace(c, then=one_done) for c in chunks]


def _chunk(job: ReadJob, views: list[np.ndarray], a: int, b: int) -> ReadJob:
    """Bytes [a, b) of the job's (concatenated) views, as a job of its own."""
    parts, pos = [], 0
    for v in views:
        lo, hi = max(a, pos), min(b, pos + v.nbytes)
        if lo < hi:
            parts.append(v[lo - pos: hi - pos])
        pos += v.nbytes
    return ReadJob(job.fd, job.offset + a, parts[0], job.what, tuple(parts[1:]))


class IOPool:
    """`threads` workers; each batch of jobs is split `split` ways and spread over them."""

    def __init__(self, threads: int, split: int, retries: int = 3,
                 reader: Reader | None = None, on_retry: Callable[..., None] | None = None,
                 inline_bytes: int = INLINE_BYTES) -> None:
        # threads, split and retries were range-checked with the engine's options
        self.threads, self.split, self.retries = threads, split, retries
        self._reader = reader or os.preadv
        # an injected reader (fault tests) sees every read: no inline pass around it
        self.inline_bytes = inline_bytes if reader is None and NOWAIT else 0
        self._on_retry = on_retry
        self._log = _io_logger()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flashmoe-io")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def read(self, jobs: list[ReadJob]) -> tuple[int, float]:
        """Run all jobs; return (bytes read, wall ms). Raises ExpertReadError on failure."""
        if not jobs:
            return 0, 0.0
        t0 = time.perf_counter()
        got = 0
        if sum(j.nbytes for j in jobs) <= self.inline_bytes:
            jobs, got = _read_cached(jobs)
        chunks = [c for j in jobs for c in _split(j, self.split)]
        if chunks:
            n = min(self.threads, len(chunks))
            done = await self._all([chunks[i::n] for i in range(n)])
            errors = [d for d in done if isinstance(d, BaseException)]
            if errors:
                raise errors[0]
            got += sum(done)
        return got, (time.perf_counter() - t0) * 1e3

    def _all(self, batches: list[list[ReadJob]]) -> asyncio.Future:
        """Run the batches in the pool; one future, woken once when the last batch ends
        (a wake-up of the event loop per thread cost more than a small read on 2 cores)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        results: list = [None] * len(batches)
        left, lock = [len(batches)], threading.Lock()

        def run(i: int, batch: list[ReadJob]) -> None:
            try:
                results[i] = self._run_batch(batch)
            except BaseException as e:  # handed to the awaiting coroutine
                results[i] = e
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                try:
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(results))
                except RuntimeError:
                    pass  # the loop closed while reading: nobody is waiting any more

        for i, batch in enumerate(batches):
            # each thread gets the caller's context, so log lines carry the run id
            self._pool.submit(contextvars.copy_context().run, run, i, batch)
        return fut

    def read_blocking(self, jobs: list[ReadJob]) -> int:
        """Synchronous variant (for tools and the raw-disk probe's reference path)."""
        return self._run_batch([c for j in jobs for c in _split(j, self.split)])

    def _run_batch(self, batch: list[ReadJob]) -> int:
        n = 0
        for job in batch:
            n += self._read_fully(job)
            if job.then is not None:
                job.then()
        return n

    def _read_fully(self, job: ReadJob) -> int:
        """Complete short reads; retry transient errors a bounded number of times."""
        views, off, failures = job.views, job.offset, 0
        left = job.nbytes
        while left:
            try:
                got = self._reader(job.fd, views, off)
            except OSError as e:
                failures += 1
                self._retry_or_raise(job, left, off, e, failures)
                continue
            if got == 0:
                raise ExpertReadError(
                    f"reading {job.what}: file ended at offset {off} with {left} bytes "
                    "still expected; the checkpoint file was truncated after it was opened")
            if not 0 < got <= left:
                raise ExpertReadError(f"reading {job.what}: the reader returned {got} for a "
                                      f"{left}-byte read; expected 0..{left}")
            views, off, left = _advance(views, got), off + got, left - got
        if failures:  # recovered: one warning per read, the retries are in the log
            self._log.warning("expert_read_recovered", what=str(job.what), attempts=failures + 1)
        return job.nbytes

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


def _read_cached(jobs: list[ReadJob]) -> tuple[list[ReadJob], int]:
    """One RWF_NOWAIT preadv per job: the bytes the page cache holds are copied now; a range
    it lacks fails at once (EAGAIN) after the kernel has started reading it. Returns what is
    left to read (the blocking path completes it, retrying and reporting errors) and the
    bytes read."""
    left, got = [], 0
    for job in jobs:
        try:
            n = os.preadv(job.fd, job.views, job.offset, NOWAIT)
        except OSError:  # EAGAIN, or an error the blocking read will retry or report
            n = 0
        if n >= job.nbytes:
            got += job.nbytes
            if job.then is not None:
                job.then()
            continue
        if n > 0:
            views = _advance(job.views, n)
            job = ReadJob(job.fd, job.offset + n, views[0], job.what, tuple(views[1:]),
                          job.then)
            got += n
        left.append(job)
    return left, got


def _advance(views: list[np.ndarray], got: int) -> list[np.ndarray]:
    """The views still to fill after a (short) read of `got` bytes into them."""
    while views and got >= views[0].nbytes:
        got -= views[0].nbytes
        views = views[1:]
    return [views[0][got:], *views[1:]] if views and got else views
