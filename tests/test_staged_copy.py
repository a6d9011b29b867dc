"""The CUDA copy path's ordering, on the CPU: a stand-in for CudaCopy whose copies land only
at synchronize(), in the order they were enqueued (one CUDA stream), so a slot read before
its copy was waited for, a staging row reused while its copy is pending, or a demotion
ordered after the slot's next copy gives wrong bytes and the parity check fails."""
from __future__ import annotations

import numpy as np
import pytest

from flashmoe.engine import model as model_mod
from tests.parity import assert_exact, budget_for, flashmoe_trace, mlx_lm_trace

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]


class DeferredCopy:
    """CudaCopy's interface over host memory; enqueued copies land at synchronize(). A real
    copy reads its source somewhere between enqueue and that wait: `eager` reads it at
    enqueue (catches a copy enqueued before its read finished), lazy at the wait (catches a
    source reused or a slot read before the wait)."""

    def __init__(self, eager: bool = False) -> None:
        self.queue: list[tuple[np.ndarray, np.ndarray]] = []
        self.copies = self.syncs = 0
        self.eager = eager

    def bind(self) -> None:
        pass

    def host_alloc(self, nbytes: int) -> np.ndarray:
        return np.full(max(nbytes, 1), 0xAB, dtype=np.uint8)[:nbytes]  # junk until written

    def to_device(self, dst: np.ndarray, src: np.ndarray) -> None:
        assert dst.nbytes == src.nbytes
        self.queue.append((dst, src.copy() if self.eager else src))
        self.copies += 1

    to_host_async = to_device

    def to_host(self, dst: np.ndarray, src: np.ndarray) -> None:
        dst[...] = src

    def synchronize(self) -> None:
        for dst, src in self.queue:
            dst.reshape(-1)[:] = src.reshape(-1)
        self.queue.clear()
        self.syncs += 1

    def close(self) -> None:
        self.synchronize()


@pytest.mark.parametrize("host_gb, eager", [(0.0, False), (1.0, False), (1.0, True)])
async def test_staged_copies_and_demotions_are_exact(wide, monkeypatch, host_gb, eager):
    fake = DeferredCopy(eager)
    monkeypatch.setattr(model_mod.cuda_copy, "select", lambda device: fake)
    path = wide("qwen3_5_moe")
    ref = mlx_lm_trace(path, PROMPT, 8)
    got, engine = await flashmoe_trace(path, PROMPT, 8, cache_budget_gb=budget_for(path, 4),
                                       cache_host_budget_gb=host_gb)
    assert all(p.cuda is fake for p in engine.pipeline.fetch.pools.values()), \
        "the staged path was not used: nothing tested"
    assert fake.copies > 0
    if host_gb:
        assert engine.host_hits() > 0
    assert_exact(ref, got)


async def test_a_slot_read_before_its_copy_landed_is_caught(wide, monkeypatch):
    """The same run with the final wait of each fetch removed must fail: this test can."""
    fake = DeferredCopy()
    monkeypatch.setattr(model_mod.cuda_copy, "select", lambda device: fake)
    calls = {"n": 0}
    real = DeferredCopy.synchronize

    def skip_last(self) -> None:  # every fetch's closing wait is its second call or later
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            real(self)

    monkeypatch.setattr(DeferredCopy, "synchronize", skip_last)
    path = wide("qwen3_5_moe")
    ref = mlx_lm_trace(path, PROMPT, 8)
    got, _ = await flashmoe_trace(path, PROMPT, 8, cache_budget_gb=budget_for(path, 4))
    with pytest.raises(AssertionError):
        assert_exact(ref, got)
