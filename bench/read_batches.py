"""Decode-shaped expert read batches through IOPool vs the bench's raw probe, no MLX.

    PYTHONPATH=. python bench/read_batches.py CKPT [--per 3] [--tokens 16] [--warm]
        [--prompt 60] [--runs engine:ra:4:3,engine:nora:4:1,inline:nora:4:1,probe:nora:4:1]

Each run is `kind:readahead:threads:split`: kind `engine` (IOPool without its inline pass),
`inline` (IOPool as the engine has it: batches <= 4 MiB tried with RWF_NOWAIT first) or
`probe` (flashmoe.bench.probe); readahead `ra` (the kernel's) or `nora` (POSIX_FADV_RANDOM).
Every token reads `--per` random experts of each of the checkpoint's MoE layers, one batch
per layer, as a cold decode with the default cache does (issue 12); cold runs drop the page
cache first and read `--prompt` experts per layer untimed first (the prompt pass). Each run
draws other experts; repeat the command and compare medians on a shared machine.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
from pathlib import Path

import numpy as np

from flashmoe.bench.probe import probe
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from flashmoe.models.loader import load_resident
from flashmoe.runtime.expert_store import ExpertStore
from flashmoe.runtime.io_pool import INLINE_BYTES, IOPool, ReadJob
from flashmoe.runtime.platform_io import evict

Trace = list[list[tuple[int, int, int]]]


def trace(store: ExpertStore, rng: random.Random, tokens: int, per: int) -> Trace:
    out = []
    for _ in range(tokens):
        for layer, le in store.layers.items():
            batch = []
            for e in rng.sample(range(le.num_experts), per):
                batch += [(store.fds[r.file_id], r.offset, r.nbytes) for r in store.ranges(layer, e)]
            out.append(batch)
    return out


async def engine_gbps(batches: Trace, warmup: Trace, threads: int, split: int,
                      inline: int, dest_gb: float = 0.0, gap_ms: float = 0.0) -> float:
    pool = IOPool(threads, split, inline_bytes=inline)
    buffers: dict[tuple[int, int], np.ndarray] = {}
    arena = _arena(dest_gb)
    pos = [0]

    def dest(i: int, n: int) -> np.ndarray:
        if arena is None:  # reused buffers, as the probe's
            return buffers.setdefault((i, n), np.empty(n, np.uint8))
        if pos[0] + n > arena.size:  # fresh memory every read, as slots filling up
            pos[0] = 0
        pos[0] += n
        return arena[pos[0] - n:pos[0]]

    def jobs(batch):
        return [ReadJob(fd, off, dest(i, n), "bench") for i, (fd, off, n) in enumerate(batch)]

    try:
        for b in warmup:
            await pool.read(jobs(b))
        nbytes, ms = 0, 0.0
        for b in batches:
            if gap_ms:  # untimed: the disk idles while a layer computes
                await asyncio.sleep(gap_ms / 1e3)
            got, t = await pool.read(jobs(b))
            nbytes, ms = nbytes + got, ms + t
    finally:
        pool.close()
    return nbytes / ms / 1e6 if ms else 0.0


def _arena(gb: float) -> np.ndarray | None:
    """`gb` of MLX memory (zeroed, so resident) to read into, like the slot arrays."""
    if not gb:
        return None
    import mlx.core as mx

    rows = max(1, int(gb * 1e9) // 2**30)  # MLX dims are int32: [rows, 1 GiB]
    a = mx.zeros((rows, 2**30), dtype=mx.uint8)
    mx.eval(a)
    _arena.keep = a  # the numpy view does not own the memory
    return np.frombuffer(memoryview(a).cast("B"), dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--per", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=60)
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dest-gb", type=float, default=0.0,
                    help="read into this much MLX memory, fresh bytes every read (as slots)")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="idle this long (untimed) before each engine batch, as compute does")
    ap.add_argument("--load", type=int, default=0,
                    help="this many threads of MLX matmuls throughout, as a token's compute")
    ap.add_argument("--runs", default="engine:ra:4:3,engine:nora:4:3,engine:nora:4:1,"
                                      "inline:nora:4:1,probe:nora:4:1")
    a = ap.parse_args()
    res = load_resident(a.ckpt, CheckpointIndex.open(a.ckpt), evaluate=False)
    rng = random.Random(a.seed)
    stop = threading.Event()
    loads = [threading.Thread(target=_compute, args=(stop,), daemon=True) for _ in range(a.load)]
    for t in loads:
        t.start()
    for run in a.runs.split(","):
        kind, ra, threads, split = run.split(":")
        store = ExpertStore(res.experts, readahead=ra == "ra")
        try:
            timed = trace(store, rng, a.tokens, a.per)
            warmup = [] if a.warm else trace(store, rng, 1, a.prompt)
            if a.warm:
                for f in store.files:
                    with open(f, "rb") as fh:
                        while fh.read(1 << 24):
                            pass
            else:
                evict(store.files)
            if kind == "probe":
                gbps = probe(timed, int(threads), before=warmup).gbps
            else:
                inline = {"inline": INLINE_BYTES, "submit": 1 << 40}.get(kind, 0)
                gbps = asyncio.run(engine_gbps(timed, warmup, int(threads), int(split), inline,
                                               a.dest_gb, a.gap_ms))
        finally:
            store.close()
        print(f"{run:24s} {gbps:6.3f} GB/s", flush=True)
    stop.set()
    for t in loads:
        t.join()


def _compute(stop: threading.Event) -> None:
    import mlx.core as mx

    w = mx.random.normal((4096, 4096))
    x = mx.random.normal((64, 4096))
    while not stop.is_set():
        mx.eval(x @ w)


if __name__ == "__main__":
    sys.exit(main())
