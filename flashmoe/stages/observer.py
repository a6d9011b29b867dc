"""What a session lets an observer see of its expert reads (bench's raw-disk probe replays them).

Observers watch; they never change what is read. A session that should not read at all
(bench's compute-alone measurement) says so with `Session(read_experts=False)`.
"""
from __future__ import annotations

from typing import Protocol

ReadRange = tuple[int, int, int]  # (fd, offset, nbytes)


class ReadObserver(Protocol):
    def expert_reads(self, layer: int, ranges: list[ReadRange]) -> None:
        """Called once per fetch that reads anything, with the byte ranges in issue order."""


class ReadTrace:
    """Records every fetch's ranges, in order; `mark()` notes where a phase ends."""

    def __init__(self) -> None:
        self.batches: list[list[ReadRange]] = []

    def expert_reads(self, layer: int, ranges: list[ReadRange]) -> None:
        self.batches.append(ranges)

    def mark(self) -> int:
        return len(self.batches)
