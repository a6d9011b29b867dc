"""Hostile but legal environments for the slot machinery, so that timing bugs show up as
wrong logits instead of hiding behind fast page-cache reads.

- SlowReader (EngineOptions.reader): a pread that first scribbles over its destination,
  waits a jittered while, then reads, sometimes short. A buffer's contents are undefined
  during a read, so this is a legal disk; any computation that reads a slot while it is
  being rewritten sees garbage.
- poison_on_release: the moment a slot is released and forgotten (cache.policy=none, or a
  failed read), its bytes become NaN/0xFF, the earliest rewrite the engine must tolerate.
  A slot released before the evaluation that reads it is then caught every time.
- slow_prefetch: speculative reads take `SlowReader.prefetch_ms` longer than the others, so
  a prefetch that is not waited for is still in flight when its slots are read.
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from unittest import mock

import numpy as np

from flashmoe.runtime.io_pool import PAGE
from flashmoe.stages.prefetch import Prefetcher

SCRIBBLE = 0xA5
POISON = 0xFF  # f32/bf16 scales of all-ones bytes are NaN
PREFETCHING = contextvars.ContextVar("PREFETCHING", default=False)  # read for a prefetch?


@dataclass
class SlowReader:
    """os.preadv with a scribble, a jittered delay and random short reads; counts calls."""

    seed: int = 0
    max_ms: float = 2.0
    scribble: bool = True
    short: bool = True
    prefetch_ms: float = 0.0  # added to each read a prefetch issues (under slow_prefetch)
    calls: int = 0
    sizes: list[int] = field(default_factory=list)
    direct: list[bool] = field(default_factory=list)  # read through an O_DIRECT descriptor
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, fd: int, bufs: list, offset: int) -> int:
        buf = bufs[0]
        with self.lock:
            self.calls += 1
            self.sizes.append(buf.nbytes)
            self.direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)))
            delay = self._rng.uniform(0, self.max_ms) / 1e3
            cut = self._rng.random() < 0.25 if self.short else False
        if PREFETCHING.get():
            delay += self.prefetch_ms / 1e3
        if self.scribble:
            buf[:] = SCRIBBLE
        time.sleep(delay)
        if cut and buf.nbytes > 2 * PAGE:
            step = PAGE if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT else 1
            buf = buf[: (buf.nbytes // 2) // step * step]
        return os.preadv(fd, [buf], offset)


def poison_on_release(engine) -> None:
    """Wrap each slot pool's release: a slot left unpinned and unowned is overwritten at once.

    Uses the pool's internals (pins, owners): test-only fault injection."""
    for pool in engine.unique_pools():
        pool.release = _poisoning(pool, pool.release)


def _poisoning(pool, release):
    def wrapped(grant, *args, **kwargs):
        release(grant, *args, **kwargs)
        for s in grant.slots.values():
            if pool._pins[s] == 0 and pool._owner[s] is None:
                poison_slot(pool, s)
    return wrapped


def poison_slot(pool, slot: int) -> None:
    for arr in pool.store.weights().values():
        slot_bytes(arr, pool.n)[slot] = POISON


def slot_bytes(arr, n: int) -> np.ndarray:
    """A writable [n, bytes] uint8 view of a slot array (zero-copy, as the engine reads)."""
    return np.frombuffer(memoryview(arr).cast("B"), dtype=np.uint8).reshape(n, -1)


@contextlib.contextmanager
def slow_prefetch() -> Iterator[None]:
    """Mark the reads a prefetch task issues (the pool's threads run in the task's context)."""
    orig = Prefetcher._read

    async def marked(self, *args, **kwargs):
        PREFETCHING.set(True)  # in the prefetch task's own context only
        return await orig(self, *args, **kwargs)

    with mock.patch.object(Prefetcher, "_read", marked):
        yield
