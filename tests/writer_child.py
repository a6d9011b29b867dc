"""Run one flashmoe writer and SIGKILL this process at a chosen point (test_write_faults.py).

    python -m tests.writer_child WRITER POINT SRC DST

POINT: `tick:N` at the N-th progress step (data partly written), `rename` just before the
finished temp folder is renamed into place, `renamed` just after (the lock not yet released).
WRITERS is also imported by the tests to re-run a writer in-process after the kill.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

Tick = Callable[[], None]


def requant(src: Path, dst: Path, tick: Tick) -> Path:
    from flashmoe.checkpoints.requant import requant as run

    return run(src, dst, bits=2, chunk_experts=4, progress=False)


def pack(src: Path, dst: Path, tick: Tick) -> Path:
    from flashmoe.models.loader import load_resident
    from flashmoe.checkpoints.packed import write_packed
    from flashmoe.checkpoints.safetensors_index import CheckpointIndex

    resident = load_resident(src, CheckpointIndex.open(src), evaluate=False)
    return write_packed(resident.experts, dst, progress=lambda n: tick())


def synth(src: Path, dst: Path, tick: Tick) -> Path:
    """The demo builder through the checkpoint cache (dst is the cache folder), made small."""
    from flashmoe.synth.cache import cached_checkpoint
    from flashmoe.synth.demo import DEMO_DIMS, build_demo

    dims = replace(DEMO_DIMS, layers=1, num_experts=4, experts_per_token=2, hidden=256,
                   moe_intermediate=128, shared_intermediate=128)
    return cached_checkpoint("demo-small", {"layers": 1},
                             lambda p: build_demo(p, dims=dims, progress=False), cache_dir=dst)


def convert(src: Path, dst: Path, tick: Tick) -> Path:
    from flashmoe.checkpoints.convert.smollm2 import convert_smollm2

    return convert_smollm2(dst, progress=False)


WRITERS: dict[str, Callable[[Path, Path, Tick], Path]] = {
    "requant": requant, "pack": pack, "synth": synth, "convert": convert}


def _arm(point: str) -> Tick:
    """Patch the kill point in; returns the tick every progress step calls."""
    import rich.progress

    from flashmoe.runtime import staging

    count = [0]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def tick() -> None:
        count[0] += 1
        if point == f"tick:{count[0]}":
            die()

    advance, rename = rich.progress.Progress.advance, os.rename

    def advance_and_tick(self, task_id, advance_by=1):  # every writer's progress bar
        advance(self, task_id, advance_by)
        tick()

    def rename_and_die(src, dst, *a, **kw):
        staged = staging.TAG in os.fsdecode(src)
        if staged and point == "rename":
            die()
        rename(src, dst, *a, **kw)
        if staged and point == "renamed":
            die()

    rich.progress.Progress.advance = advance_and_tick
    os.rename = rename_and_die
    return tick


if __name__ == "__main__":
    writer, point, src, dst = sys.argv[1:5]
    WRITERS[writer](Path(src), Path(dst), _arm(point))
    sys.exit(3)  # the kill point was never reached
