"""macOS branches, run on Linux CI by standing in the platform facts (no O_DIRECT, no
posix_fadvise, no cgroups, 16 KiB pages, a Metal buffer cap), so they cannot rot."""
from __future__ import annotations

import fcntl
import os
import sys

import pytest

from flashmoe.bench import baseline, cgroup
from flashmoe.runtime import platform_io


@pytest.fixture
def darwin(monkeypatch):
    """What macOS lacks: O_DIRECT, posix_fadvise; and what it says it is."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    return monkeypatch


def test_direct_io_uses_f_nocache(darwin, tmp_path):
    calls = []
    darwin.setattr(fcntl, "F_NOCACHE", 48, raising=False)
    darwin.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((cmd, arg)) or 0)
    f = tmp_path / "x.bin"
    f.write_bytes(b"\0" * 100)
    fd = platform_io.open_uncached(f)
    os.close(fd)
    assert calls == [(48, 1)]


def test_direct_io_without_any_uncached_mode_is_one_config_error(darwin, tmp_path):
    from flashmoe.errors import ConfigError

    darwin.delattr(fcntl, "F_NOCACHE", raising=False)
    f = tmp_path / "x.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ConfigError, match="neither O_DIRECT nor F_NOCACHE; turn direct reads off"):
        platform_io.open_uncached(f)


def test_cold_evicts_with_msync_where_fadvise_is_missing(darwin, tmp_path):
    f = tmp_path / "x.bin"
    data = os.urandom(1 << 20)
    f.write_bytes(data)
    assert platform_io.cold_method() == "msync_invalidate"
    assert platform_io.evict([f]) == "msync_invalidate"  # the real mmap/msync/munmap calls
    assert f.read_bytes() == data  # evicting never changes the file


def test_memory_limited_baseline_is_refused_without_cgroups(darwin, tmp_path):
    cg, why = cgroup.make("x", 8.0)
    assert cg is None and "Linux-only" in why
    res = baseline.run_baseline(tmp_path, [1, 2], 4, None, 2, limit_gb=8.0)
    assert res["status"] == "refused"
    assert "no memory cgroup" in res["error"] and "was not run" in res["error"]


def test_page_size_comes_from_the_os(monkeypatch):
    monkeypatch.setattr(os, "sysconf", lambda name: 16384)
    assert platform_io.page_size() == 16384


def test_slot_arrays_stay_under_metal_max_buffer_length():
    """Metal's cap joins the 2 GiB one in the same pool-splitting rule (engine/model.py)."""
    from flashmoe.engine.model import MAX_SLOT_ARRAY_BYTES, max_slot_array_bytes, split_under_cap

    info = lambda: {"max_buffer_length": 10 * 2**20}  # noqa: E731
    assert platform_io.metal_buffer_limit(info) == 10 * 2**20
    assert platform_io.metal_buffer_limit(lambda: {}) is None
    assert max_slot_array_bytes(info) == 10 * 2**20
    assert max_slot_array_bytes(lambda: {"max_buffer_length": 2**40}) == MAX_SLOT_ARRAY_BYTES
    cap = max_slot_array_bytes(info) // (3 * 2**20)  # 3 MiB parts: 3 slots per array
    assert [n for _, n in split_under_cap(list(range(4)), 12, cap)] == [3, 3, 3, 3]


def test_no_linux_only_call_is_reachable_without_its_fallback():
    """Every O_DIRECT / posix_fadvise use is in platform_io, behind its hasattr check."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flashmoe"
    for f in root.rglob("*.py"):
        text = f.read_text()
        if f.name != "platform_io.py":
            assert "O_DIRECT |" not in text and "os.posix_fadvise(" not in text, f
