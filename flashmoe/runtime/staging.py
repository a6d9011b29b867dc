"""Where every writer puts its output: a locked temp folder beside the target, renamed at the end.

    parent/.NAME.flashmoe-tmp-<pid>-<hex>        the output while it is being written
    parent/.NAME.flashmoe-tmp-<pid>-<hex>.lock   flock'ed by the writer for as long as it runs

A writer killed with SIGKILL leaves both behind, but the kernel drops its flock, so the next
writer into the same parent folder can tell an orphan (lock free) from a live writer (lock held)
and removes only the orphans. Disk errors while writing (ENOSPC, EIO, EDQUOT, a read-only or
unwritable folder) become one WriteError naming the file and the cause, the temp folder removed.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flashmoe.errors import ConfigError, WriteError

TAG = ".flashmoe-tmp-"
LOCK = ".lock"
MARGIN_BYTES = 16 << 20  # headers, JSON, tokenizer files and filesystem metadata
FULL = {errno.ENOSPC: "the filesystem is full", errno.EDQUOT: "the disk quota is exhausted"}
DENIED = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
          errno.EPERM: "operation not permitted"}
DISK = {errno.EIO: "the disk reported an I/O error", errno.EFBIG: "the file is too large"}


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `folder`."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:  # the folder may not exist yet
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


def check_space(folder: Path, needed: int, hint: str) -> None:
    """Refuse before the first byte when `needed` (+ a small margin) exceeds the free space."""
    free = free_bytes(folder)
    if TAG in Path(folder).name:
        folder = Path(folder).parent  # name the folder the user chose, not our temp folder
    if needed + MARGIN_BYTES > free:
        raise WriteError(f"not enough free space in {folder}: writing needs {needed:,} bytes "
                         f"({needed / 1e9:.2f} GB) but its filesystem has {free:,} bytes "
                         f"({free / 1e9:.2f} GB) free; free {(needed + MARGIN_BYTES - free) / 1e9:.2f}"
                         f" GB there or {hint}")


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under `path` (sparse files count what they really hold)."""
    total = 0
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        try:
            total += p.lstat().st_blocks * 512
        except OSError:
            pass
    return total


def sweep_orphans(folder: Path, log: Any = None) -> int:
    """Remove the temp folders (and lock files) of killed writers in `folder`; returns the
    bytes reclaimed. A temp folder whose lock is flock'ed belongs to a writer still running
    (in this process or another) and is left alone."""
    try:
        names = sorted({p.name.removesuffix(LOCK) for p in Path(folder).glob(f".*{TAG}*")})
    except OSError:
        return 0
    reclaimed = 0
    for name in names:
        tmp = Path(folder) / name
        existed = tmp.exists()
        nbytes = _remove_orphan(tmp, tmp.with_name(name + LOCK))
        if nbytes is None or not existed:
            continue
        reclaimed += nbytes
        _note(log, "orphan_removed", f"removed {tmp}, left by an interrupted flashmoe writer "
              f"({nbytes:,} bytes reclaimed)", path=str(tmp), reclaimed_bytes=nbytes)
    return reclaimed


def _remove_orphan(tmp: Path, lock: Path) -> int | None:
    """Bytes removed, or None when a live writer holds `lock`."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        fd = None  # no lock file: no writer can own the folder (see _lock)
    except OSError:
        return None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        nbytes = disk_usage(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            lock.unlink(missing_ok=True)
        return nbytes
    except BlockingIOError:
        return None
    finally:
        if fd is not None:
            os.close(fd)


def _lock(path: Path) -> int:
    """An flock'ed descriptor of `path`, which still names it (a sweeper may have unlinked the
    file between our open and our flock: then lock a fresh one)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # dropped by the kernel if this process dies
        try:
            st, mine = os.stat(path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def staged(final: Path, *, needed: int | None, hint: str, log: Any = None,
           check: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temp folder beside `final`; on success rename it to `final`.

    Before anything is written: orphans of killed writers in the parent folder are removed,
    `check()` runs (the writer's own refusals), `final` must be absent or an empty folder, and
    `needed` bytes (when known) must fit. `hint` completes the advice of an error, e.g.
    "choose another folder with task.out=DIR"."""
    final = Path(final)
    parent = final.parent
    with disk_errors(parent, final, hint):
        parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(parent, log)
    if check is not None:
        check()
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        raise ConfigError(f"{final} already exists and is not empty; flashmoe never overwrites "
                          f"an output. Remove it or {hint}")
    if needed is not None:
        check_space(parent, needed, hint)
    name = f".{final.name}{TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, lock = parent / name, parent / (name + LOCK)
    fd = -1
    try:
        with disk_errors(tmp, final, hint):
            fd = _lock(lock)
            tmp.mkdir(0o755)
            yield tmp
            if final.exists():
                final.rmdir()  # empty, checked above
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
        if fd >= 0:
            lock.unlink(missing_ok=True)
            os.close(fd)


@contextmanager
def disk_errors(tmp: Path, final: Path, hint: str) -> Iterator[None]:
    """Turn a failed write inside `tmp` into one WriteError naming the file (as under `final`)."""
    try:
        yield
    except OSError as e:
        cause = {**FULL, **DENIED, **DISK}.get(e.errno or -1)
        if cause is None:
            raise
        file = _failed_file(tmp, final, e.filename)
        advice = (f"free space there or {hint}" if e.errno in FULL else
                  f"make it writable or {hint}" if e.errno in DENIED else
                  "check the disk (dmesg) and run again")
        raise WriteError(f"could not write {file}: {os.strerror(e.errno)} "
                         f"[{errno.errorcode.get(e.errno, e.errno)}: {cause}]; nothing was left "
                         f"behind (the unfinished output was removed); {advice}") from None
    except RuntimeError as e:  # MLX's own writers (save_safetensors) raise without an errno
        if "[write]" not in str(e):
            raise
        file = _failed_file(tmp, final, None)
        raise WriteError(f"could not write {file}: {e} ({free_bytes(tmp):,} bytes free on its "
                         f"filesystem); nothing was left behind; free space there or {hint}") \
            from None


def _failed_file(tmp: Path, final: Path, filename: Any) -> Path:
    """The file being written: the error's own filename, else the newest file in `tmp`."""
    path = Path(os.fsdecode(filename)) if filename else None
    if path is None:
        files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
        path = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    if path is None:
        return final
    try:
        return final / path.relative_to(tmp)  # the name the user will look for
    except ValueError:
        return path.parent if TAG in path.name else path  # our lock file: name its folder


def _note(log: Any, event: str, text: str, **fields: Any) -> None:
    if log is not None:
        log.warning(event, **fields)
    else:
        print(f"flashmoe: {text}", file=sys.stderr)
