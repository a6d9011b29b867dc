"""Expert bytes into CUDA slots through pinned staging and the driver's async copies.

mlx-cuda's arrays are CUDA managed memory: a pread straight into a slot lands in host pages
that the GPU's next read migrates page by page (5.3 GB/s on the H200). Reading into pinned
host memory (cuMemHostAlloc) and copying each expert into the slot's own device address with
cuMemcpyHtoDAsync_v2 measured 26.3 GB/s (issue 12, /work/shared/gpu-probes/um_probe2.py).
MLX cannot wait on a foreign CUDA event, so the copy stream is synchronised before the
evaluation that reads the slots.

Everything here sits behind `select()`: it returns None (today's path: preads straight into
the slots) unless MLX runs on a CUDA GPU and libcuda.so.1 has every entry point needed. Apple
memory is truly unified and the CPU backend has no device memory: neither needs any of it.
"""
from __future__ import annotations

import ctypes as C
from typing import Callable

import numpy as np

LIBCUDA = "libcuda.so.1"
SYMBOLS = ("cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent",
           "cuStreamCreate", "cuStreamSynchronize", "cuMemHostAlloc", "cuMemFreeHost",
           "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoH_v2", "cuMemcpyDtoHAsync_v2", "cuEventCreate",
           "cuEventRecord", "cuStreamWaitEvent")
EVENT_DISABLE_TIMING = 0x2
EVENT_CAP = 4096  # events recorded between full synchronisations before one is forced
Loader = Callable[[str], object]  # ctypes.CDLL, or a fake in tests
# Copies are plain integers, computed from base addresses taken once: a numpy view's
# `.ctypes.data` per part cost more host time than the copy's launch (H200, K=10, two tiers:
# 66 copies in and 25 out per layer, 1.26 ms of grant bookkeeping per layer)
Spans = list[tuple[int, int]]  # (address, bytes) per expert part
Copies = list[tuple[int, int, int]]  # (destination, source, bytes)
STAGING_ROWS = 64  # experts read per group (453 MB pinned at Qwen3.5-397B's 7 MB experts)


class CudaError(RuntimeError):
    pass


def address(view: np.ndarray) -> int:
    """The address of a numpy view over MLX memory (np.frombuffer(memoryview(arr)...))."""
    return view.ctypes.data


class CudaCopy:
    """One context (the primary one MLX uses), pinned allocations, and two non-blocking
    streams: `up` for host-to-device copies (reads and promotions into slots), `down` for
    device-to-host ones (demotions out of slots), so the two directions run on the GPU's two
    copy engines at once. What must come first is said with keys: `wait(keys, down=...)`
    makes the next copies of that stream wait for the copies last recorded under those keys
    (`mark`); keys name a slot's fill or drain, or a host row's read or write."""

    def __init__(self, lib) -> None:
        self._cu = lib
        u64, vp, sz = C.c_ulonglong, C.c_void_p, C.c_size_t
        lib.cuMemcpyHtoDAsync_v2.argtypes = [u64, vp, sz, vp]
        lib.cuMemcpyDtoH_v2.argtypes = [vp, u64, sz]
        lib.cuMemcpyDtoHAsync_v2.argtypes = [vp, u64, sz, vp]
        lib.cuStreamSynchronize.argtypes = [vp]
        lib.cuMemHostAlloc.argtypes = [C.POINTER(vp), sz, C.c_uint]
        lib.cuMemFreeHost.argtypes = [vp]
        lib.cuEventCreate.argtypes = [C.POINTER(vp), C.c_uint]
        lib.cuEventRecord.argtypes = [vp, vp]
        lib.cuStreamWaitEvent.argtypes = [vp, vp, C.c_uint]
        # events are only freed at close: either name will do (cuda.h maps one to the other)
        self._destroy = getattr(lib, "cuEventDestroy_v2", None) or getattr(lib, "cuEventDestroy",
                                                                           None)
        self._check("cuInit", lib.cuInit(0))
        dev, ctx = C.c_int(), C.c_void_p()
        self._check("cuDeviceGet", lib.cuDeviceGet(C.byref(dev), 0))
        self._check("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(C.byref(ctx), dev))
        self._ctx = ctx
        self.bind()
        self._up, self._down = C.c_void_p(), C.c_void_p()
        for st in (self._up, self._down):
            self._check("cuStreamCreate", lib.cuStreamCreate(C.byref(st), 1))  # non-blocking
        self._pinned: list[int] = []
        self._marks: dict = {}  # key -> event recorded after its last copy (since the last sync)
        self._spare: list[C.c_void_p] = []  # events free to record again
        self._all_events: list[C.c_void_p] = []

    def bind(self) -> None:
        """Make MLX's context current in the calling thread (driver calls are per thread)."""
        self._check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Pinned (page-locked) host memory as a writable uint8 array; freed by close()."""
        p = C.c_void_p()
        self._check("cuMemHostAlloc", self._cu.cuMemHostAlloc(C.byref(p), max(nbytes, 1), 0))
        self._pinned.append(p.value)
        return np.ctypeslib.as_array((C.c_uint8 * max(nbytes, 1)).from_address(p.value))[:nbytes]

    def up(self, copies: Copies) -> None:
        """Enqueue host-to-device copies (pinned source, slot destination) on `up`."""
        self._enqueue("cuMemcpyHtoDAsync_v2", self._up, copies)

    def down(self, copies: Copies) -> None:
        """Enqueue device-to-host copies (slot source, pinned destination) on `down`."""
        self._enqueue("cuMemcpyDtoHAsync_v2", self._down, copies)

    def _enqueue(self, name: str, stream, copies: Copies) -> None:
        f = getattr(self._cu, name)
        for dst, src, n in copies:
            rc = f(dst, src, n, stream)
            if rc:
                self._check(name, rc)

    def to_host(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy slot memory `src` into host `dst` now."""
        assert dst.nbytes == src.nbytes
        self._check("cuMemcpyDtoH_v2", self._cu.cuMemcpyDtoH_v2(address(dst), address(src),
                                                                 dst.nbytes))

    def wait(self, keys, down: bool) -> None:
        """The stream's next copies start after the copies last marked under `keys`."""
        stream = self._down if down else self._up
        for key in keys:
            ev = self._marks.get(key)
            if ev is not None:
                self._check("cuStreamWaitEvent", self._cu.cuStreamWaitEvent(stream, ev, 0))

    def mark(self, keys, down: bool) -> None:
        """Record that the stream's copies enqueued so far are what `keys` wait for."""
        if not self._spare and len(self._all_events) >= EVENT_CAP:
            self.synchronize()  # every event completes: all can be recorded again
        ev = self._spare.pop() if self._spare else self._new_event()
        self._check("cuEventRecord", self._cu.cuEventRecord(ev, self._down if down else self._up))
        for key in keys:
            self._marks[key] = ev

    def synchronize(self, down: bool = True) -> None:
        """Every enqueued host-to-device copy (and, with down, every demotion) has landed:
        call before an evaluation reads the slots."""
        self._check("cuStreamSynchronize", self._cu.cuStreamSynchronize(self._up))
        if down:
            self._check("cuStreamSynchronize", self._cu.cuStreamSynchronize(self._down))
            self._spare = list(self._all_events)  # every recorded event has completed
            self._marks.clear()

    def close(self) -> None:
        if self._pinned:
            self.synchronize()  # no copy may still read or write what is freed
        for p in self._pinned:
            self._cu.cuMemFreeHost(p)
        self._pinned = []
        for ev in self._all_events if self._destroy is not None else ():
            self._destroy(ev)
        self._all_events, self._spare = [], []

    def _new_event(self) -> C.c_void_p:
        ev = C.c_void_p()
        self._check("cuEventCreate", self._cu.cuEventCreate(C.byref(ev), EVENT_DISABLE_TIMING))
        self._all_events.append(ev)
        return ev

    def _check(self, name: str, rc: int) -> None:
        if rc != 0:
            raise CudaError(f"{name} returned CUDA error {rc}")


def copies(dsts: Spans, srcs: Spans) -> Copies:
    """(destination, source, bytes) per part, from two spans lists of equal sizes."""
    out = [(d, s, n) for (d, n), (s, m) in zip(dsts, srcs) if n == m]
    assert len(out) == len(dsts) == len(srcs), "a part's two ends differ in size"
    return out


def row_spans(base: int, row_bytes: int, parts: list[tuple[int, int]], row: int) -> Spans:
    """The spans of `row` in a buffer of rows at `base` whose parts lie back to back
    (`parts`: (offset in the row, bytes) each): pinned staging rows, host-tier rows."""
    at = base + row * row_bytes
    return [(at + a, n) for a, n in parts]


def fill(copy: CudaCopy, slot: tuple, pairs: Copies, row: tuple | None = None) -> None:
    """Copy an expert into a slot on `up` (a read from staging, or a promotion from host
    `row`): after the slot's last drain and the row's last write; the slot's next drain and
    the row's next write wait for it."""
    copy.wait([("drain", *slot), *([("rw", *row)] if row else [])], down=False)
    copy.up(pairs)
    copy.mark([("fill", *slot), *([("rr", *row)] if row else [])], down=False)


def drain(copy: CudaCopy, slot: tuple, pairs: Copies, row: tuple) -> None:
    """Copy a slot's expert out to host `row` on `down` (a demotion): after the slot's last
    fill and the row's last read; the slot's next fill and the row's next read wait for it."""
    copy.wait([("fill", *slot), ("rr", *row)], down=True)
    copy.down(pairs)
    copy.mark([("drain", *slot), ("rw", *row)], down=True)


class PinnedStaging:
    """`rows` experts' worth of pinned host memory, parts back to back per row, so a packed
    expert is one read; reads land here, then one async copy per part goes to the slot."""

    def __init__(self, cuda: CudaCopy, parts, rows: int = STAGING_ROWS) -> None:
        self.rows = rows
        sizes = [p.nbytes for p in parts]
        self._cuts = list(zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes))
        self._buf = cuda.host_alloc(rows * sum(sizes)).reshape(rows, sum(sizes))
        self._base, self._row = address(self._buf), sum(sizes)

    def views(self, row: int) -> list[np.ndarray]:
        return [self._buf[row, a:a + n] for a, n in self._cuts]

    def spans(self, row: int) -> Spans:
        """(address, bytes) of each part in `row`: the sources of its copies to a slot."""
        return row_spans(self._base, self._row, self._cuts, row)


def select(device: str, loader: Loader = C.CDLL, gpu_is_cuda: bool | None = None
           ) -> CudaCopy | None:
    """The CUDA copy path when MLX runs on a CUDA GPU and the driver has what it needs;
    None (reads straight into the slots) on the CPU, on Metal, or without libcuda."""
    if device != "gpu":
        return None
    if gpu_is_cuda is None:
        gpu_is_cuda = _mlx_cuda()
    if not gpu_is_cuda:
        return None
    try:
        lib = loader(LIBCUDA)
    except OSError:
        return None
    if not all(hasattr(lib, s) for s in SYMBOLS):
        return None
    try:
        return CudaCopy(lib)
    except CudaError:
        return None


def _mlx_cuda() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def host_allocator(copy: CudaCopy | None) -> Callable[[int], np.ndarray] | None:
    """Pinned rows for the host tier on CUDA (fast copies both ways); plain memory elsewhere."""
    return copy.host_alloc if copy is not None else None
