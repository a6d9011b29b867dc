"""The host-RAM tier: exact bytes back from RAM, per-tier accounting, exclusive tiers."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.runtime.expert_store import LayerExperts, PartSpec
from flashmoe.runtime.host_tier import HostTier
from flashmoe.runtime.slot_pool import SlotPool
from tests.reference import expert_nbytes, flashmoe_greedy

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]


def spec() -> LayerExperts:
    parts = (PartSpec("gate_proj.weight", (4,), mx.uint32, 16),
             PartSpec("gate_proj.scales", (3,), mx.bfloat16, 6))
    return LayerExperts(0, 16, parts, (), ())


def fill(pool: SlotPool, grant, layer: int) -> None:
    """Stand-in for a read: each part gets bytes derived from (layer, expert)."""
    for e, s in grant.misses:
        for i, v in enumerate(pool.store.views(s)):
            v[:] = (np.arange(v.nbytes) + 7 * e + 3 * layer + i) % 251
        pool.store.finish(s)


@pytest.mark.parametrize("upcast", [False, True])
def test_demoted_experts_come_back_byte_for_byte(upcast):
    pool = SlotPool(spec(), 2, "lru", upcast=upcast, host=HostTier([16, 6], 3))
    want = {}
    for e in [1, 2, 3, 4, 1, 2, 5, 3]:  # 2 slots + 3 host rows: 1 and 2 come back from RAM
        g = pool.grant(0, [e])
        fill(pool, g, 0)
        (s,) = g.slots.values()
        got = [v.copy() for v in pool.store.views(s)]
        want.setdefault(e, got)
        assert all(np.array_equal(a, b) for a, b in zip(got, want[e])), e
        pool.release(g)
    assert pool.host_hits == 3 and pool.misses == 5  # 1, 2, 3 promoted; 5 experts read once
    # the last swap needed a 4th row for a moment (3 reserved, 2 demoted): 4 was dropped
    assert pool.host.dropped == 1 and (0, 4) not in pool.host and (0, 2) in pool.host


def test_full_host_tier_drops_least_recently_demoted_and_clear_empties_it():
    tier = HostTier([4], 2)
    for e in range(3):
        tier.demote((0, e), [np.full(4, e, np.uint8)])
    assert (0, 0) not in tier and (0, 1) in tier and tier.dropped == 1
    out = np.zeros(4, np.uint8)
    tier.promote((0, 2), [out])
    assert (out == 2).all() and (0, 2) not in tier  # exclusive: promoted means gone here
    tier.clear()
    assert (0, 1) not in tier


def test_a_promoted_experts_row_is_kept_so_leaving_the_slots_again_copies_nothing():
    tier = HostTier([4], 2)
    tier.demote((0, 1), [np.full(4, 1, np.uint8)])
    slot = np.zeros(4, np.uint8)
    tier.promote((0, 1), [slot])
    assert (slot == 1).all() and (0, 1) not in tier  # in the slots now, not promotable
    tier.demote((0, 1), [np.full(4, 99, np.uint8)])  # had it copied, the row would read 99
    assert tier.demoted == 1 and tier.kept == 1 and (0, 1) in tier
    tier.promote((0, 1), [slot])
    assert (slot == 1).all()


def test_kept_copies_make_room_before_any_demoted_expert_is_dropped():
    tier = HostTier([4], 2)
    for e in (1, 2):
        tier.demote((0, e), [np.full(4, e, np.uint8)])
    tier.promote((0, 1), [np.zeros(4, np.uint8)])  # 1's row kept: the tier is still full
    tier.demote((0, 3), [np.full(4, 3, np.uint8)])  # takes 1's kept row, not 2's
    assert tier.dropped == 0 and (0, 2) in tier and (0, 3) in tier
    tier.demote((0, 1), [np.full(4, 1, np.uint8)])  # no copy left: copied, 2 dropped
    assert tier.kept == 0 and tier.dropped == 1 and (0, 2) not in tier
    out = np.zeros(4, np.uint8)
    tier.promote((0, 3), [out])
    assert (out == 3).all()


@pytest.mark.parametrize("ahead", [0, 2])
def test_clean_ahead_copies_the_next_victims_out_so_evicting_them_is_free(ahead):
    """lru, 8 slots, a cycle of 12 experts: each miss evicts the least recent slot. With the
    next 2 victims copied out ahead, every eviction finds its copy there: none copied as it
    leaves, and each expert still comes back byte for byte."""
    pool = SlotPool(spec(), 8, "lru", host=HostTier([16, 6], 16), clean_ahead=ahead)
    want = {}
    for e in list(range(12)) * 3:
        g = pool.grant(0, [e])
        fill(pool, g, 0)
        (s,) = g.slots.values()
        got = [v.copy() for v in pool.store.views(s)]
        want.setdefault(e, got)
        assert all(np.array_equal(a, b) for a, b in zip(got, want[e])), e
        pool.release(g)
    evictions = 36 - 8
    copied, kept = pool.host_demotions
    assert copied + kept == evictions and pool.host_hits == evictions - 4  # 8..11 read once
    if ahead:
        assert copied == 0 and pool.host_stashed > 0
    else:
        assert copied > 0 and pool.host_stashed == 0


def test_clean_ahead_stops_when_the_tier_has_no_spare_rows_for_it():
    """8 slots + 5 rows for 12 experts: once the tier holds demoted experts, one row is
    spare, fewer than twice the window; stashing would then reclaim its own copies' rows
    every grant, so it stops (while the tier is still empty it may stash)."""
    pool = SlotPool(spec(), 8, "lru", host=HostTier([16, 6], 5), clean_ahead=2)
    for _ in range(3):
        before = pool.host_stashed
        for e in range(12):
            g = pool.grant(0, [e])
            fill(pool, g, 0)
            pool.release(g)
    assert pool.host_stashed == before and pool.host.spare() < 4


def test_policy_none_has_no_host_tier():
    assert SlotPool(spec(), 2, "none", host=HostTier([16, 6], 3)).host is None


@pytest.mark.parametrize("policy", ["lru", "lfu"])
async def test_two_tiers_are_exact_and_counted(tiny, policy):
    path = tiny("qwen3_5_moe")
    nbytes, k = expert_nbytes(path)
    small = 2.5 * k * nbytes / 2**30  # a couple of tokens' experts: most misses evict
    base, _, e0 = await flashmoe_greedy(path, PROMPT, 10, cache_policy=policy,
                                        cache_budget_gb=small, dtype="float32")
    two, _, e1 = await flashmoe_greedy(path, PROMPT, 10, cache_policy=policy,
                                       cache_budget_gb=small, cache_host_budget_gb=1.0,
                                       dtype="float32")
    assert two == base
    assert e0.host_hits() == 0 and e1.host_hits() > 0
    hits0, reads0 = e0.cache_stats()
    hits1, reads1 = e1.cache_stats()
    assert reads1 + e1.host_hits() == reads0 and hits1 == hits0  # same lookups, fewer reads
    copied, kept, stashed = e1.host_demotions()
    # the tier has room beyond the experts outside the slots: promotions leave copies there,
    # so most experts that churn out of the slots again need no copy (a kept one is one a
    # promotion left)
    assert copied > 0 and 0 < kept <= e1.host_hits() and stashed == 0  # no CUDA: none ahead


def test_the_run_summary_counts_each_tier(tiny, tmp_path):
    import json
    import subprocess
    import sys

    path = tiny("qwen3_5_moe")
    nbytes, k = expert_nbytes(path)
    out = subprocess.run(
        [sys.executable, "-m", "flashmoe", f"model.path={path}", "max_tokens=10",
         "prompt=The sea", f"cache.budget_gb={2.5 * k * nbytes / 2**30}",
         "cache.host_budget_gb=0.5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    (log,) = tmp_path.rglob("flashmoe.jsonl")
    (s,) = [e for e in map(json.loads, log.read_text().splitlines())
            if e["event"] == "run_summary"]
    assert s["host_hit_rate"] > 0 and s["device_hit_rate"] + s["host_hit_rate"] <= 1
    assert s["host_demotions_copied"] > 0 and s["host_demotions_kept"] > 0
    assert s["host_stashed"] == 0  # copies ahead only with CUDA copies


@pytest.mark.parametrize("policy, slots, prefetch", [("lru", 4, False), ("lfu", 5, False),
                                                     ("lru", 6, True)])
async def test_two_tiers_match_mlx_lm_at_every_step(wide, policy, slots, prefetch):
    """Pools that evict every step, the host tier serving the misses it holds: mlx-lm's bits."""
    from tests.parity import assert_exact, budget_for, flashmoe_trace, mlx_lm_trace

    path = wide("qwen3_5_moe")
    ref = mlx_lm_trace(path, PROMPT, 8)
    got, engine = await flashmoe_trace(path, PROMPT, 8, cache_policy=policy,
                                       cache_budget_gb=budget_for(path, slots),
                                       cache_host_budget_gb=1.0, prefetch=prefetch)
    assert engine.host_hits() > 0  # with prefetch: guessed experts promoted ahead too
    assert_exact(ref, got)
