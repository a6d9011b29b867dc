"""The core check: flashmoe streaming == mlx-lm resident, token for token."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import with_k
from tests.reference import flashmoe_greedy, mlx_lm_greedy

PROMPTS = {1: [17], 20: [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150, 9, 480, 33, 120, 8, 200, 61, 3]}
STEPS = 32


def assert_same(ref, got):
    ref_toks, ref_last = ref
    toks, last = got[0], got[1]
    assert toks == ref_toks
    rel = np.abs(last - ref_last).max() / np.abs(ref_last).max()
    assert rel < 1e-3, f"last-position logits differ by {rel:.2e} relative"


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe"])
@pytest.mark.parametrize("plen", [1, 20])
async def test_parity_every_split(tiny, family, plen):
    path = tiny(family)
    ref = mlx_lm_greedy(path, PROMPTS[plen], STEPS)
    for split in (1, 2, 3, 4, 8):
        assert_same(ref, await flashmoe_greedy(path, PROMPTS[plen], STEPS, io_split=split))


@pytest.mark.parametrize("family", ["qwen3_next", "mixtral", "qwen2_moe"])
async def test_parity_other_families(tiny, family):
    path = tiny(family)
    ref = mlx_lm_greedy(path, PROMPTS[20], STEPS)
    assert_same(ref, await flashmoe_greedy(path, PROMPTS[20], STEPS, io_split=4))


async def test_parity_two_bit_experts(tiny):
    path = tiny("qwen3_5_moe", bits=2)
    for plen in (1, 20):
        ref = mlx_lm_greedy(path, PROMPTS[plen], STEPS)
        assert_same(ref, await flashmoe_greedy(path, PROMPTS[plen], STEPS, io_split=3))


@pytest.mark.parametrize("family,k", [("qwen3_5_moe", 2), ("qwen3_moe", 1)])
async def test_parity_lowered_k(tiny, tmp_path, family, k):
    path = tiny(family)
    ref = mlx_lm_greedy(with_k(path, tmp_path / "k", k), PROMPTS[20], STEPS)
    assert_same(ref, await flashmoe_greedy(path, PROMPTS[20], STEPS, experts_per_token=k))


async def test_prompt_union_far_larger_than_slot_pool(tiny):
    """A 20-token prompt routes to all 16 experts; the pool holds 4: chunks must stay exact."""
    from flashmoe.checkpoints.safetensors_index import CheckpointIndex

    path = tiny("qwen3_5_moe")
    index = CheckpointIndex.open(path)
    expert = sum(t.nbytes for n, t in index.tensors.items()
                 if ".layers.0.mlp.switch_mlp." in n) // 16  # 16 experts per layer
    ref = mlx_lm_greedy(path, PROMPTS[20], STEPS)
    got = await flashmoe_greedy(path, PROMPTS[20], STEPS, cache_budget_gb=4.5 * expert / 2**30)
    engine = got[2]
    assert max(p.n for p in engine.pools.values()) == 4
    assert engine.totals.steps[0].chunks >= 4 * 3  # ≥ 4 chunks in each of the layers
    assert_same(ref, got)


@pytest.mark.parametrize("dtype", [None, "float32"])
async def test_parity_bf16_checkpoint(tiny, dtype):
    """bf16 weights as mlx-community ships them: as-is, and with f32 activations (upcast)."""
    import mlx.core as mx

    path = tiny("qwen3_5_moe", dtype=mx.bfloat16)
    ref = mlx_lm_greedy(path, PROMPTS[20], 16, upcast=dtype == "float32")
    got = await flashmoe_greedy(path, PROMPTS[20], 16, io_split=2, dtype=dtype)
    assert got[0] == ref[0]
    rel = np.abs(got[1] - ref[1]).max() / np.abs(ref[1]).max()
    assert rel < (1e-3 if dtype else 2e-2), rel  # bf16 logits carry ~3 significant digits
