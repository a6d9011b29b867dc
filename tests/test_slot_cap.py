"""Slot arrays stay under the 2 GiB that MLX CUDA's gather_qmm can address: pools split."""
from __future__ import annotations

import flashmoe.engine.model as engine_mod
from tests.reference import expert_nbytes, flashmoe_greedy, mlx_lm_greedy

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]


async def test_pools_split_under_the_cap_stay_exact(tiny, monkeypatch):
    path = tiny("qwen3_5_moe")
    expert, k = expert_nbytes(path)
    ref = mlx_lm_greedy(path, PROMPT, 16)
    # a cap of 9 slots of the largest part: the 4 layers' 40 slots become 4 pools of 9
    largest = max(1, expert // 3)
    monkeypatch.setattr(engine_mod, "MAX_SLOT_ARRAY_BYTES", 9 * largest)
    toks, last, engine = await flashmoe_greedy(path, PROMPT, 16,
                                               cache_budget_gb=40 * expert / 2**30)
    pools = engine.unique_pools()
    assert len(pools) > 1
    for pool in pools:
        assert all(a.nbytes <= 9 * largest for a in pool.store.arrays.values())
    assert toks == ref[0]
    assert (last == ref[1]).all()
