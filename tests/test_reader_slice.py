"""io.reader_slice_us: the engine's reader threads, and the bench probe's, run with a short
scheduler slice (Linux >= 6.12 EEVDF), so a completed read preempts the decode's compute;
0 leaves the kernel's slice. Elsewhere the call is a no-op that says so."""
from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

from flashmoe.bench import probe as probe_mod
from flashmoe.runtime.io_pool import IOPool
from flashmoe.runtime.platform_io import short_slice


def _slice_ns() -> int | None:
    """The calling thread's slice from /proc (None where the kernel does not show it)."""
    sched = Path(f"/proc/self/task/{threading.get_native_id()}/sched")
    found = re.search(r"se\.slice\s*:\s*(\d+)", sched.read_text()) if sched.exists() else None
    return int(found.group(1)) if found else None


def _kernel_slices() -> bool:
    """Whether this kernel takes a fair task's custom slice (set and read back in a thread)."""
    got = []
    t = threading.Thread(target=lambda: got.append((short_slice(250), _slice_ns())))
    t.start()
    t.join()
    return got[0] == (True, 250_000)


needs_slices = pytest.mark.skipif(sys.platform != "linux" or not _kernel_slices(),
                                  reason="no custom fair-task slices here (Linux >= 6.12)")


@needs_slices
def test_reader_threads_get_the_configured_slice() -> None:
    default = IOPool(2, 1, slice_us=0)
    short = IOPool(2, 1, slice_us=100)
    try:
        assert short._pool.submit(_slice_ns).result() == 100_000
        kernel = default._pool.submit(_slice_ns).result()
        assert kernel is not None and kernel != 100_000  # 0: the kernel's own slice
    finally:
        default.close()
        short.close()


@needs_slices
def test_the_probe_schedules_its_threads_as_the_engine_does(tmp_path, monkeypatch) -> None:
    """The probe replays the engine's reads on threads with the engine's slice (like for like)."""
    import os

    seen = []
    real = probe_mod._read_group
    monkeypatch.setattr(probe_mod, "_read_group",
                        lambda group, buf: (seen.append(_slice_ns()), real(group, buf))[1])
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(1 << 16))
    fd = os.open(f, os.O_RDONLY)
    try:
        res = probe_mod.probe([[(fd, 0, 4096), (fd, 8192, 4096)]], threads=2, slice_us=100)
    finally:
        os.close(fd)
    assert res.bytes_read == 8192 and seen == [100_000, 100_000]


def test_zero_or_an_unsupported_platform_leaves_the_thread_alone(monkeypatch) -> None:
    assert short_slice(0) is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert short_slice(100) is False
