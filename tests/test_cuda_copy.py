"""The CUDA copy path: chosen only where MLX runs on CUDA and the driver has what it needs."""
from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.runtime import cuda_copy
from flashmoe.runtime.cuda_copy import SYMBOLS, CudaCopy, select


def _has_cuda() -> bool:
    try:
        ctypes.CDLL(cuda_copy.LIBCUDA)
    except OSError:
        return False
    return cuda_copy._mlx_cuda()


class FakeLib:
    """Every entry point present; cuInit answers `init_rc`."""

    def __init__(self, init_rc: int = 0, missing: str | None = None) -> None:
        for name in SYMBOLS:
            if name != missing:
                setattr(self, name, _Fn(lambda *a: 0))
        if missing != "cuInit":
            self.cuInit = _Fn(lambda *a: init_rc)


class _Fn:
    def __init__(self, f) -> None:
        self.f, self.argtypes = f, None

    def __call__(self, *a):
        return self.f(*a)


def _no_lib(name: str):
    raise OSError(f"{name}: cannot open shared object file")


@pytest.mark.parametrize("device, is_cuda, loader", [
    ("cpu", True, lambda n: FakeLib()),  # the CPU backend: no device memory to copy into
    ("gpu", False, lambda n: FakeLib()),  # Metal: unified memory, preads land in place
    ("gpu", True, _no_lib),  # an MLX CUDA build on a box without the driver library
    ("gpu", True, lambda n: FakeLib(missing="cuMemcpyHtoDAsync_v2")),  # an old driver
    ("gpu", True, lambda n: FakeLib(init_rc=100)),  # CUDA_ERROR_NO_DEVICE
])
def test_falls_back_to_reading_straight_into_slots(device, is_cuda, loader):
    assert select(device, loader, gpu_is_cuda=is_cuda) is None


def test_a_complete_driver_is_chosen():
    copy = select("gpu", lambda n: FakeLib(), gpu_is_cuda=True)
    assert isinstance(copy, CudaCopy)


def test_cpu_build_here_uses_todays_path():
    if _has_cuda():
        pytest.skip("CUDA present")
    assert select("gpu") is None and select("cpu") is None


@pytest.mark.skipif(not _has_cuda(), reason="needs MLX on CUDA and libcuda.so.1")
def test_pinned_copies_land_in_the_slot_and_come_back():
    mx.set_default_device(mx.gpu)
    slots = mx.zeros((4, 1 << 20), dtype=mx.uint8)
    mx.eval(slots)
    copy = select("gpu")
    assert copy is not None
    view = np.frombuffer(memoryview(slots).cast("B"), dtype=np.uint8).reshape(4, -1)
    pinned = copy.host_alloc(1 << 20)
    pinned[:] = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    copy.up([(cuda_copy.address(view[2]), cuda_copy.address(pinned), pinned.nbytes)])
    copy.synchronize()
    assert np.array_equal(np.array(slots[2]), pinned)
    assert int(mx.sum(slots[2].astype(mx.uint32)).item()) == int(pinned.astype(np.uint64).sum())
    back = np.zeros(1 << 20, np.uint8)
    copy.to_host(back, view[2])
    assert np.array_equal(back, pinned)
    # a demotion (down stream) then the new expert's copy into the same slot (up stream),
    # ordered by an event, not by the host waiting: the row holds the old bytes, the slot
    # the new ones
    row, new = copy.host_alloc(1 << 20), copy.host_alloc(1 << 20)
    new[:] = 255 - pinned
    copy.down([(cuda_copy.address(row), cuda_copy.address(view[2]), row.nbytes)])
    copy.mark([("drain", 2)], down=True)
    copy.wait([("drain", 2)], down=False)
    copy.up([(cuda_copy.address(view[2]), cuda_copy.address(new), new.nbytes)])
    copy.synchronize(down=False)
    assert np.array_equal(np.array(slots[2]), new)
    copy.synchronize()
    assert np.array_equal(row, pinned) and np.array_equal(np.array(slots[2]), new)
    copy.close()
