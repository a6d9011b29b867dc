"""Platform facts and their fallbacks, so no Linux-only call is reachable on macOS:
uncached reads (O_DIRECT / F_NOCACHE), page-cache eviction for cold runs (posix_fadvise /
msync MS_INVALIDATE, what `vmtouch -e` does on macOS), the OS page size, Metal's buffer cap."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from flashmoe.errors import OptionError

MS_INVALIDATE = 0x2  # the same bit on Linux and macOS


def page_size() -> int:
    """The OS page size (4 KiB on x86 Linux, 16 KiB on Apple silicon)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return mmap.PAGESIZE


def open_uncached(path: Path) -> int:
    """A read-only descriptor whose reads bypass the page cache."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            raise OptionError("io_direct", "true", f"but {path} cannot be opened with O_DIRECT "
                              f"({e.strerror}); this filesystem does not support direct I/O, "
                              "turn direct reads off") from None
    import fcntl

    if not hasattr(fcntl, "F_NOCACHE"):
        raise OptionError("io_direct", "true", f"but this platform ({sys.platform}) has "
                          "neither O_DIRECT nor F_NOCACHE; turn direct reads off")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)  # macOS: reads bypass the unified buffer cache
    except OSError as e:
        os.close(fd)
        raise OptionError("io_direct", "true", f"but F_NOCACHE fails on {path} "
                          f"({e.strerror}); turn direct reads off") from None
    return fd


def no_readahead(fd: int) -> None:
    """Reads on `fd` fetch their own range only (POSIX_FADV_RANDOM); where the platform has
    no posix_fadvise (macOS) its reads are left as they are."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def cold_method() -> str:
    """How evict() drops cached pages here (the bench summary's `cold_method`)."""
    return "posix_fadvise_dontneed" if hasattr(os, "posix_fadvise") else "msync_invalidate"


def evict(files: Sequence[Path]) -> str:
    """Drop the files' pages from the OS page cache (no root needed); returns the method."""
    method = cold_method()
    drop: Callable[[int, int], None] = _fadvise if method.startswith("posix") else _msync
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            drop(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return method


def _fadvise(fd: int, size: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _msync(fd: int, size: int) -> None:
    """Map the file and invalidate the mapping's cached pages (macOS has no fadvise)."""
    if size == 0:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed before msync(MS_INVALIDATE)")
    try:
        libc.msync(addr, size, MS_INVALIDATE)
    finally:
        libc.munmap(addr, size)


def metal_buffer_limit(device_info: Callable[[], dict] | None = None) -> int | None:
    """Metal's max buffer length in bytes: no one slot array may be larger (None: no Metal)."""
    if device_info is None:
        import mlx.core as mx

        metal = getattr(mx, "metal", None)
        if metal is None or not metal.is_available():
            return None
        device_info = metal.device_info
    limit = int(device_info().get("max_buffer_length", 0))
    return limit or None
