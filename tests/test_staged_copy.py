"""The CUDA copy path's ordering, on the CPU: a stand-in for CudaCopy whose two streams'
copies land only at synchronize(), so a slot read before its copy was waited for, a staging
row reused while its copy is pending, or a demotion not ordered before the slot's next fill
(or a promotion before its row's demotion) gives wrong bytes and the parity check fails."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from flashmoe.engine import model as model_mod
from tests.parity import assert_exact, budget_for, flashmoe_trace, mlx_lm_trace

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]


class DeferredCopy:
    """CudaCopy's interface over host memory: two queues (the `up` and `down` streams) whose
    copies run only inside synchronize(), each stream in its order, a stream's `wait` blocking
    it until the copies marked under those keys ran. Which stream runs ahead is the test's
    choice (`prefer`), and synchronize(down=False) runs `down` only as far as `up` needs: a
    missing wait then shows as wrong bytes. A real copy reads its source between enqueue and
    completion: `eager` reads it at enqueue (catches a copy enqueued before its read ended)."""

    def __init__(self, eager: bool = False, prefer: str = "up") -> None:
        self.q: dict[str, list[tuple]] = {"up": [], "down": []}
        self.marks: dict = {}
        self.done: set[int] = set()
        self.eager, self.prefer, self.copies, self._n = eager, prefer, 0, 0

    def bind(self) -> None:
        pass

    def host_alloc(self, nbytes: int) -> np.ndarray:
        return np.full(max(nbytes, 1), 0xAB, dtype=np.uint8)[:nbytes]  # junk until written

    def up(self, copies) -> None:
        for c in copies:
            self._copy("up", *c)

    def down(self, copies) -> None:
        for c in copies:
            self._copy("down", *c)

    def to_host(self, dst: np.ndarray, src: np.ndarray) -> None:
        dst[...] = src

    def wait(self, keys, down: bool) -> None:
        q = self.q["down" if down else "up"]
        q.extend(("wait", self.marks[k]) for k in keys if k in self.marks)

    def mark(self, keys, down: bool) -> None:
        self._n += 1
        self.q["down" if down else "up"].append(("mark", self._n))
        self.marks.update((k, self._n) for k in keys)

    def synchronize(self, down: bool = True) -> None:
        order = ["up", "down"] if self.prefer == "up" else ["down", "up"]
        while self.q["up"] or (down and self.q["down"]):
            moved = False
            for name in order:
                if name == "down" and not down and self._runs("up"):
                    continue  # lazy: down moves only while up waits for it
                while self._runs(name):
                    self._step(name)
                    moved = True
            assert moved, "the two streams wait for each other"
        if down:
            self.marks.clear()

    def close(self) -> None:
        self.synchronize()

    def _copy(self, stream: str, dst: int, src: int, n: int) -> None:
        """Addresses, as the real driver gets them: host memory here (the CPU backend's)."""
        assert isinstance(dst, int) and isinstance(src, int) and n > 0
        self.q[stream].append(("copy", dst, ctypes.string_at(src, n) if self.eager else src, n))
        self.copies += 1

    def _runs(self, name: str) -> bool:
        q = self.q[name]
        return bool(q) and not (q[0][0] == "wait" and q[0][1] not in self.done)

    def _step(self, name: str) -> None:
        op = self.q[name].pop(0)
        if op[0] == "copy":
            ctypes.memmove(op[1], op[2], op[3])
        elif op[0] == "mark":
            self.done.add(op[1])


def _at(view: np.ndarray) -> list[tuple[int, int]]:
    """A slot's one part as the CUDA copy path names it: (address, bytes)."""
    return [(view.ctypes.data, view.nbytes)]


@pytest.mark.parametrize("host_gb, eager, prefer", [(0.0, False, "up"), (1.0, False, "up"),
                                                    (1.0, False, "down"), (1.0, True, "up")])
async def test_staged_copies_and_demotions_are_exact(wide, monkeypatch, host_gb, eager, prefer):
    fake = DeferredCopy(eager, prefer)
    monkeypatch.setattr(model_mod.cuda_copy, "select", lambda device: fake)
    path = wide("qwen3_5_moe")
    ref = mlx_lm_trace(path, PROMPT, 8)
    got, engine = await flashmoe_trace(path, PROMPT, 8, cache_budget_gb=budget_for(path, 4),
                                       cache_host_budget_gb=host_gb)
    assert all(p.cuda is fake for p in engine.pipeline.fetch.pools.values()), \
        "the staged path was not used: nothing tested"
    assert fake.copies > 0
    if host_gb:  # promotions, and copies out ahead of evictions (SlotPool._clean_ahead)
        assert engine.host_hits() > 0 and engine.host_demotions()[2] > 0
    assert_exact(ref, got)


async def test_a_slot_read_before_its_copy_landed_is_caught(wide, monkeypatch):
    """The same run with the final wait of each fetch removed must fail: this test can."""
    fake = DeferredCopy()
    monkeypatch.setattr(model_mod.cuda_copy, "select", lambda device: fake)
    calls = {"n": 0}
    real = DeferredCopy.synchronize

    def skip_last(self, down: bool = True) -> None:  # every fetch's closing wait is its second
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            real(self, down)

    monkeypatch.setattr(DeferredCopy, "synchronize", skip_last)
    path = wide("qwen3_5_moe")
    ref = mlx_lm_trace(path, PROMPT, 8)
    got, _ = await flashmoe_trace(path, PROMPT, 8, cache_budget_gb=budget_for(path, 4))
    with pytest.raises(AssertionError):
        assert_exact(ref, got)


def test_a_promotion_waits_for_its_rows_demotion():
    """A demoted expert promoted again into an empty slot before the demotion ran: the
    promotion must wait for the row's write, whatever the streams' pace."""
    from flashmoe.runtime.host_tier import HostTier

    fake = DeferredCopy(prefer="up")
    tier = HostTier([8], 2, alloc=fake.host_alloc, cuda=fake)
    slots = np.zeros((2, 8), np.uint8)
    slots[0] = 7  # expert (0, 3) sits in slot 0
    tier.demote((0, 3), _at(slots[0]), slot=("pool", 0))
    tier.promote((0, 3), _at(slots[1]), slot=("pool", 1))  # slot 1 held nothing: no drain
    fake.synchronize(down=False)  # what an evaluation waits for
    assert (slots[1] == 7).all()


def test_a_kept_row_taken_for_a_demotion_waits_for_the_promotion_reading_it():
    """A promoted expert's row is kept; the next demotion takes it while the promotion's copy
    out of it has not run: the demotion must wait for that read, whatever the streams' pace."""
    from flashmoe.runtime.host_tier import HostTier

    fake = DeferredCopy(prefer="down")
    tier = HostTier([8], 1, alloc=fake.host_alloc, cuda=fake)
    slots = np.zeros((3, 8), np.uint8)
    slots[0], slots[2] = 7, 9  # experts (0, 1) in slot 0 and (0, 2) in slot 2
    tier.demote((0, 1), _at(slots[0]), slot=("pool", 0))
    tier.promote((0, 1), _at(slots[1]), slot=("pool", 1))  # row 0 kept, its copy pending
    tier.demote((0, 2), _at(slots[2]), slot=("pool", 2))  # the one row: taken from the kept copy
    fake.synchronize(down=False)
    fake.synchronize(down=True)
    assert (slots[1] == 7).all() and tier.kept == 0 and (0, 2) in tier
    out = np.zeros(8, np.uint8)
    tier.promote((0, 2), _at(out), slot=("pool", 1))
    fake.synchronize(down=False)
    assert (out == 9).all()


def test_a_slot_refilled_after_its_stash_waits_for_the_copy_out():
    """An expert copied out ahead of its eviction (stash), then evicted and its slot refilled
    by a promotion while the copy out has not run: the refill must wait for it, or the kept
    copy would hold the new expert's bytes."""
    from flashmoe.runtime.host_tier import HostTier

    fake = DeferredCopy(prefer="up")
    tier = HostTier([8], 3, alloc=fake.host_alloc, cuda=fake)
    slots = np.zeros((2, 8), np.uint8)
    slots[1] = 5
    tier.demote((0, 2), _at(slots[1]), slot=("pool", 1))  # expert (0, 2) waits in the tier
    fake.synchronize()  # ... and its copy out has landed: nothing else orders the streams
    slots[0] = 7  # expert (0, 1) in slot 0
    assert tier.stash((0, 1), _at(slots[0]), slot=("pool", 0)) and tier.has_copy((0, 1))
    tier.demote((0, 1), _at(slots[0]), slot=("pool", 0))  # evicted: free, the stash is its copy
    tier.promote((0, 2), _at(slots[0]), slot=("pool", 0))  # slot 0 refilled
    fake.synchronize(down=False)
    fake.synchronize(down=True)
    assert (slots[0] == 5).all() and tier.kept == 1 and tier.demoted == 1
    out = np.zeros(8, np.uint8)
    tier.promote((0, 1), _at(out), slot=("pool", 1))
    fake.synchronize(down=False)
    assert (out == 7).all()


async def test_a_failed_landing_inside_the_cached_job_leaves_no_slot_claiming_it(tiny,
                                                                                 monkeypatch):
    """On the CUDA copy path a layer's copies in from the host tier land while the next
    layer's graph is built (stages/cached_run.py). If that synchronise fails, the error
    reaches the caller, and neither the promoted experts nor the grant's pins stay."""
    from flashmoe.engine import Engine, EngineOptions
    from flashmoe.stages import cached_run

    fake = DeferredCopy()
    monkeypatch.setattr(model_mod.cuda_copy, "select", lambda device: fake)
    path = tiny("qwen3_5_moe")
    engine = await Engine.open(path, EngineOptions(
        device="cpu", cache_budget_gb=budget_for(path, 24), cache_host_budget_gb=1.0),
        tokenizer=False)
    failed = []

    def broken(pool, grant, stats, read):
        failed.append((pool, grant))
        raise RuntimeError("cuStreamSynchronize returned CUDA error 700")

    try:
        _ = [ev async for ev in engine.generate(PROMPT, 16)]  # warm: both tiers hold all
        monkeypatch.setattr(cached_run, "_promoted", broken)
        with pytest.raises(RuntimeError, match="CUDA error 700"):
            _ = [ev async for ev in engine.generate(PROMPT, 16)]
    finally:
        await engine.aclose()
    (pool, grant), = failed
    assert pool.cuda is fake and grant.promoted
    assert all(pool._owner[s] is None for _, s in grant.promoted)
    assert pool.free_slots() == pool.n  # every pin released
