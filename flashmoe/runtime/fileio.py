"""Exact positional reads and writes (short transfers completed) for offline tools."""
from __future__ import annotations

import os

from flashmoe.errors import CheckpointError


def pread_exact(fd: int, buf: memoryview, offset: int, what: str) -> None:
    """Fill `buf` from `offset`; a file that ends first is a truncated checkpoint."""
    got = 0
    while got < len(buf):
        try:
            n = os.preadv(fd, [buf[got:]], offset + got)
        except OSError as e:  # a source read: not to be mistaken for a failed write
            raise CheckpointError(f"reading {what} at byte {offset + got} failed: "
                                  f"{os.strerror(e.errno or 0)}; check the disk holding the "
                                  "checkpoint and run again") from None
        if n == 0:
            raise CheckpointError(f"{what} ends before byte {offset + len(buf)}: the shard is "
                                  "truncated; re-download the checkpoint")
        got += n


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)
