"""CPU and wall time per MB of cold expert-sized reads, buffered vs O_DIRECT, one thread.

    PYTHONPATH=. python bench/read_cpu.py FILE [--rounds 2]

Each round drops FILE's page cache, then reads 60 random page-aligned 2 MiB ranges and 200
of 128 KiB (an expert's weight and scales/biases parts) with POSIX_FADV_RANDOM, buffered
then O_DIRECT; the thread's CPU (RUSAGE_THREAD) and wall time per MB are printed. Linux only.
Use a file the bench is not reading: its page cache is dropped.
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import resource
import time

SIZES = ((2 << 20, 60), (128 << 10, 200))


def one(path: str, direct: bool, nbytes: int, count: int, seed: int) -> str:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf = mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT needs
        buf[:] = b"\1" * nbytes  # written: no page faults inside the timed reads
        rng = random.Random(seed)
        pages = (os.fstat(fd).st_size - nbytes) // 4096
        offsets = [rng.randrange(pages) * 4096 for _ in range(count)]
        r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        for off in offsets:
            os.preadv(fd, [buf], off)
        r1, t1 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
    finally:
        os.close(fd)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    mb = nbytes * count / 1e6
    return (f"{'direct  ' if direct else 'buffered'} {nbytes >> 10:5d} KiB x{count}: "
            f"cpu {cpu * 1e3 / mb:.3f} ms/MB, wall {(t1 - t0) * 1e3 / mb:.3f} ms/MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for r in range(args.rounds):
        for direct in (False, True):
            for nbytes, count in SIZES:
                print(one(args.file, direct, nbytes, count, seed=r))


if __name__ == "__main__":
    main()
