"""One runner over every family flashmoe lists: a tiny random checkpoint built by mlx-lm,
streamed by flashmoe, against resident mlx-lm (greedy tokens identical, logits close)."""
from __future__ import annotations

import pytest

from tests.fixtures.tiny import FAMILIES
from tests.reference import flashmoe_greedy, mlx_lm_greedy
from tests.reference import assert_same
from tests.test_parity import PROMPTS

STEPS = 8
NEW = [f for f in FAMILIES if f not in ("qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral",
                                        "qwen2_moe")]  # those five: tests/test_parity.py


@pytest.mark.parametrize("family", NEW)
async def test_family_parity(tiny, family):
    path = tiny(family)
    ref = mlx_lm_greedy(path, PROMPTS[20], STEPS)
    assert_same(ref, await flashmoe_greedy(path, PROMPTS[20], STEPS, io_split=2))


@pytest.mark.parametrize("family", NEW)
async def test_family_parity_in_chunks(tiny, family):
    """A slot pool of exactly k experts: the prompt's union is served chunk by chunk."""
    from flashmoe.checkpoints.safetensors_index import CheckpointIndex

    path = tiny(family)
    fam_k = _k(path)
    index = CheckpointIndex.open(path)
    layer = min(int(n.split("layers.")[1].split(".")[0]) for n in index.tensors
                if ".experts." in n or ".switch_mlp." in n)
    expert = sum(t.nbytes for n, t in index.tensors.items()
                 if f"layers.{layer}." in n and (".experts." in n or ".switch_mlp." in n))
    expert //= _experts(path)
    ref = mlx_lm_greedy(path, PROMPTS[20], 2)
    got = await flashmoe_greedy(path, PROMPTS[20], 2, cache_budget_gb=(fam_k + 0.5) * expert / 2**30)
    assert got[2].totals.steps[0].chunks > 0
    assert_same(ref, got)


def _k(path) -> int:
    import json

    cfg = json.loads((path / "config.json").read_text())
    return int(cfg.get("text_config", cfg)["num_experts_per_tok"])


def _experts(path) -> int:
    import json

    from flashmoe.models import family_for

    cfg = json.loads((path / "config.json").read_text())
    return family_for(cfg).num_experts(cfg)


async def test_family_k_override_is_the_routers_own(tiny, tmp_path):
    """model.experts_per_token reaches the block's own router (deepseek_v3 keeps top_k in its
    gate): flashmoe with k=2 equals mlx-lm on a copy whose config says 2."""
    from tests.conftest import with_k

    path = tiny("deepseek_v3")
    ref = mlx_lm_greedy(with_k(path, tmp_path / "k2", 2), PROMPTS[20], STEPS)
    assert_same(ref, await flashmoe_greedy(path, PROMPTS[20], STEPS, experts_per_token=2))
