"""SlotPool bookkeeping: the O(1)/O(log n) eviction makes the same choices as a full scan."""
from __future__ import annotations

import random
import resource
import sys
from collections import OrderedDict

import mlx.core as mx
import pytest

from flashmoe.runtime.expert_store import LayerExperts, PartSpec
from flashmoe.runtime.slot_pool import SlotArrays, SlotPool


def tiny_spec() -> LayerExperts:
    part = PartSpec("gate_proj.weight", (1,), mx.uint32, 4)
    return LayerExperts(0, 64, (part,), (), ())


class ScanPool:
    """The reference: every slot scanned in recency order per miss (the pool before issue 12)."""

    def __init__(self, n: int, policy: str) -> None:
        self.n, self.policy = n, policy
        self.owner: list = [None] * n
        self.table: dict = {}
        self.pins = [0] * n
        self.recency = OrderedDict((s, None) for s in range(n))
        self.uses: dict = {}

    def free_slots(self) -> int:
        return sum(1 for p in self.pins if p == 0)

    def clear(self) -> None:
        for s in range(self.n):
            if self.pins[s] == 0:
                self.forget(s)

    def grant(self, layer: int, experts: list[int]) -> dict[int, int]:
        slots = {}
        for e in experts:
            key = (layer, e)
            self.uses[key] = self.uses.get(key, 0) + 1
            s = self.table.get(key)
            if s is None:
                s = self.victim()
                self.forget(s)
                self.owner[s], self.table[key] = key, s
            self.pins[s] += 1
            self.recency.move_to_end(s)
            slots[e] = s
        return slots

    def release(self, slots: dict[int, int], valid: bool, keep: bool) -> None:
        for s in slots.values():
            self.pins[s] -= 1
            if not valid or (self.policy == "none" and not keep):
                self.forget(s)

    def victim(self) -> int:
        free = [s for s in self.recency if self.pins[s] == 0]
        empty = [s for s in free if self.owner[s] is None]
        if empty:
            return empty[0]
        if self.policy == "lfu":
            return min(free, key=lambda s: self.uses.get(self.owner[s], 0))
        return free[0]

    def forget(self, s: int) -> None:
        if self.owner[s] is not None:
            self.table.pop(self.owner[s], None)
            self.owner[s] = None


@pytest.mark.parametrize("policy", ["lru", "lfu", "none"])
@pytest.mark.parametrize("seed", range(6))
def test_same_choices_as_a_full_scan(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([4, 9, 33])
    pool, ref = SlotPool(tiny_spec(), n, policy), ScanPool(n, policy)
    held: list = []  # grants not yet released, released in random order
    weights = [1 / (e + 1) for e in range(40)]  # skewed routing, as a router's
    for _ in range(1500):
        assert pool.free_slots() == ref.free_slots()
        op = rng.random()
        if op < 0.55 and pool.free_slots():
            layer = rng.randrange(3)
            k = rng.randint(1, min(6, pool.free_slots()))
            experts = list(dict.fromkeys(rng.choices(range(40), weights, k=k)))
            grant = pool.grant(layer, experts)
            assert grant.slots == ref.grant(layer, experts)
            assert {e for e, _ in grant.misses} <= set(experts)
            held.append(grant)
        elif held:
            grant = held.pop(rng.randrange(len(held)))
            valid, keep = rng.random() > 0.05, rng.random() < 0.2
            pool.release(grant, valid=valid, keep=keep)
            ref.release(grant.slots, valid, keep)
        if rng.random() < 0.005:
            pool.clear()
            ref.clear()
    assert pool._table == ref.table


def test_hits_and_misses_are_counted() -> None:
    pool = SlotPool(tiny_spec(), 4, "lru")
    g = pool.grant(0, [1, 2])
    assert len(g.misses) == 2 and pool.free_slots() == 2
    pool.release(g)
    g = pool.grant(0, [2, 3])
    assert [e for e, _ in g.misses] == [3] and (pool.hits, pool.misses) == (1, 3)


def test_stale_heap_entries_stay_bounded() -> None:
    """All hits for a long run: lfu pushes an entry per release, compaction keeps it O(n)."""
    pool = SlotPool(tiny_spec(), 8, "lfu")
    for _ in range(5000):
        pool.release(pool.grant(0, [1, 2, 3]))
    assert len(pool._order._rare) <= 2 * 8 + 64


@pytest.mark.parametrize("policy", ["lru", "lfu", "none"])
def test_where_maps_follow_every_grant_eviction_and_clear(policy):
    """The speculative step trusts `where` as the cache's answer: after any sequence of grants,
    releases (some invalid: a failed read), evictions and clears it equals `cached`."""
    rng = random.Random(7)
    pool = SlotPool(tiny_spec(), 12, policy)
    maps = {layer: pool.where(layer, 64) for layer in (0, 1)}
    for n in range(400):
        layer = rng.randrange(2)
        grant = pool.grant(layer, rng.sample(range(64), rng.randint(1, 6)))
        pool.release(grant, valid=rng.random() > 0.1)
        if n % 97 == 0:
            pool.clear()
        for lay, where in maps.items():
            want = [pool._table.get((lay, e), -1) for e in range(64)]
            assert where.tolist() == want, f"step {n}: layer {lay}'s map is stale"


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("seed", range(4))
def test_touch_leaves_what_a_grant_and_release_leave(policy: str, seed: int) -> None:
    """The whole-token step's touch() of cached experts, against grant + release: every
    later choice (which slot a miss takes) and the hit counts must be the same."""
    rng = random.Random(seed)
    n = rng.choice([5, 12, 33])
    a, b = SlotPool(tiny_spec(), n, policy), SlotPool(tiny_spec(), n, policy)
    weights = [1 / (e + 1) for e in range(40)]
    touched = 0
    for _ in range(800):
        layer = rng.randrange(2)
        k = rng.randint(1, min(6, n))
        experts = sorted(set(rng.choices(range(40), weights, k=k)))
        if all(a.cached(layer, e) for e in experts) and rng.random() < 0.7:
            a.touch(layer, experts)
            b.release(b.grant(layer, experts))
            touched += 1
        else:
            ga, gb = a.grant(layer, experts), b.grant(layer, experts)
            assert ga.slots == gb.slots and ga.misses == gb.misses
            a.release(ga)
            b.release(gb)
        assert (a.hits, a.misses, a.free_slots()) == (b.hits, b.misses, b.free_slots())
    assert touched > 10


@pytest.mark.skipif(sys.platform != "linux", reason="minor-fault counts as Linux reports them")
def test_upcast_staging_is_resident_before_the_first_read() -> None:
    """A staged part (bf16 scales read for f32 slots) lands in memory already written: a page
    first touched by a pread faults inside it (the cold read path's CPU, BENCHMARKS.md)."""
    part = PartSpec("gate_proj.scales", (64, 512), mx.bfloat16, 64 * 512 * 2)
    arrays = SlotArrays(LayerExperts(0, 64, (part,), (), ()), 64, upcast=True)
    rows = [arrays.views(s)[0] for s in range(64)]
    assert rows[0].nbytes == part.nbytes  # the staging row, not the f32 slot
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for row in rows:
        row[:] = 7  # as a pread's copy would
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    pages = 64 * part.nbytes // 4096
    assert faults < pages // 4, f"{faults} page faults writing {pages} staged pages"
