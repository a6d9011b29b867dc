"""Does a GPU kernel see bytes the host wrote into an MLX slot array after the GPU read it?

Run on a CUDA (or Metal) build: `python bench/gpu_slot_probe.py [scratch-file]`. Mimics the
engine: slot arrays made on one thread, preads (split in 4) into their byte views from I/O
threads, a GPU kernel reading the slot from the MLX thread, slots rewritten round-robin so
every write lands on memory the GPU has read before. Prints mismatches per mode.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

N_SLOTS, SLOT = 4, 3 << 20  # bytes per slot; 4 slots so each is rewritten every 4th step
TRIALS = 64


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_slot_probe.bin"
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, 16 * SLOT, dtype=np.uint8)
    blob.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    dev = mx.gpu if mx.is_available(mx.gpu) else mx.cpu
    mx.set_default_device(dev)
    slots = mx.zeros((N_SLOTS, SLOT), dtype=mx.uint8)
    mx.eval(slots)
    view = np.frombuffer(memoryview(slots).cast("B"), dtype=np.uint8).reshape(N_SLOTS, -1)
    mlx_thread = ThreadPoolExecutor(1, initializer=lambda: mx.set_default_device(dev))
    io = ThreadPoolExecutor(8)
    big = mx.random.normal((4096, 4096))
    mx.eval(big)

    def gpu_read(s: int) -> np.ndarray:  # a kernel reads the slot; its output is device memory
        out = mx.take(slots, mx.array([s]), axis=0)[0] ^ mx.array(0, dtype=mx.uint8)
        mx.eval(out)
        return np.array(out)

    def write(mode: str, s: int, src: int) -> None:
        off = src * SLOT
        if mode == "numpy":
            view[s][:] = blob[off:off + SLOT]
            return
        pieces = 4 if mode == "pread_split4" else 1
        step = SLOT // pieces
        futs = [io.submit(os.preadv, fd, [view[s][i * step:(i + 1) * step]], off + i * step)
                for i in range(pieces)]
        assert all(f.result() == step for f in futs)

    def busy() -> None:  # an async evaluation in flight while the host writes (shared expert)
        mx.async_eval(big @ big)

    results = {}
    for mode in ("numpy", "pread", "pread_split4", "pread_split4+async"):
        bad = 0
        for t in range(TRIALS):
            s, src = t % N_SLOTS, int(rng.integers(0, 16))
            mlx_thread.submit(gpu_read, s).result()  # the GPU has read this slot before
            if mode.endswith("+async"):
                mlx_thread.submit(busy).result()
            write(mode.split("+")[0], s, src)
            got = mlx_thread.submit(gpu_read, s).result()
            want = blob[src * SLOT:(src + 1) * SLOT]
            host_ok = np.array_equal(view[s], want)
            gpu_ok = np.array_equal(got, want)
            if not (host_ok and gpu_ok):
                bad += 1
                if bad <= 3:
                    diff = np.flatnonzero(got != want)
                    print(f"  {mode} trial {t}: host view ok={host_ok} gpu ok={gpu_ok} "
                          f"{diff.size} bytes differ, first at {diff[:1]}")
        results[mode] = bad
        print(f"{mode}: {bad}/{TRIALS} trials where the GPU saw other bytes than were written",
              flush=True)
    mlx_thread.submit(lambda: (mx.synchronize(), mx.clear_streams())).result()
    os.close(fd)
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
