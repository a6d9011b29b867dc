"""The core check: flashmoe streaming == mlx-lm resident, bit for bit, at every prompt position
and every decode step (tests/parity.py), with slot pools small enough that every step evicts."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import with_k
from tests.parity import assert_exact, budget_for, flashmoe_trace, mlx_lm_trace

FAMILIES = ["qwen3_5_moe", "qwen3_moe", "qwen3_next", "mixtral", "qwen2_moe"]
PROMPTS = {
    1: [17],
    20: [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150, 9, 480, 33, 120, 8, 200, 61, 3],
    48: [int(t) for t in np.random.default_rng(7).integers(3, 500, 48)],
}
STEPS = 32


def assert_evicts_every_step(engine) -> None:
    """Every forward read experts into slots that held others: the pool never settles."""
    fetched = [s.experts_fetched for s in engine.totals.steps]
    assert all(n > 0 for n in fetched), fetched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plen", sorted(PROMPTS))
async def test_parity_every_family_tiny_pool(tiny, reference, family, plen):
    """K slots (the least a layer needs) shared by all layers; prompts up to 48 tokens."""
    path = tiny(family)
    k_slots = 2 if family in ("mixtral", "qwen2_moe") else 4
    got, engine = await flashmoe_trace(path, PROMPTS[plen], STEPS,
                                       cache_budget_gb=budget_for(path, k_slots))
    assert max(p.n for p in engine.unique_pools()) == engine.k == k_slots
    assert_evicts_every_step(engine)
    if plen > 1:
        assert engine.totals.steps[0].chunks > 0  # the prompt's union exceeded the pool
    assert_exact(reference(path, PROMPTS[plen]), got)


async def test_parity_two_bit_experts(tiny, reference):
    path = tiny("qwen3_5_moe", bits=2)
    for plen in (1, 20):
        got, _ = await flashmoe_trace(path, PROMPTS[plen], STEPS, cache_policy="none")
        assert_exact(reference(path, PROMPTS[plen]), got)


@pytest.mark.parametrize("family,k", [("qwen3_5_moe", 2), ("qwen3_moe", 1)])
async def test_parity_lowered_k(tiny, tmp_path, family, k):
    path = tiny(family)
    ref = mlx_lm_trace(with_k(path, tmp_path / "k", k), PROMPTS[20], STEPS)
    got, _ = await flashmoe_trace(path, PROMPTS[20], STEPS, experts_per_token=k,
                                  cache_budget_gb=budget_for(path, k))
    assert_exact(ref, got)


async def test_prompt_union_far_larger_than_slot_pool(tiny, reference):
    """A 48-token prompt routes to all 16 experts; the pool holds 4: chunks must stay exact."""
    path = tiny("qwen3_5_moe")
    got, engine = await flashmoe_trace(path, PROMPTS[48], STEPS,
                                       cache_budget_gb=budget_for(path, 4))
    assert max(p.n for p in engine.unique_pools()) == 4
    assert engine.totals.steps[0].chunks >= 4 * 4  # ≥ 4 chunks in each of the 4 layers
    assert_exact(reference(path, PROMPTS[48]), got)


@pytest.mark.parametrize("dtype", [None, "float32"])
async def test_parity_bf16_checkpoint(tiny, reference, dtype):
    """bf16 weights as mlx-community ships them: as-is (bf16 activations, mlx-lm's own path),
    and with f32 activations against mlx-lm with its bf16 parameters widened to f32."""
    import mlx.core as mx

    path = tiny("qwen3_5_moe", dtype=mx.bfloat16)
    got, _ = await flashmoe_trace(path, PROMPTS[20], 16, io_split=2, dtype=dtype,
                                  cache_budget_gb=budget_for(path, 4))
    assert_exact(reference(path, PROMPTS[20], 16, upcast=dtype == "float32"), got)
