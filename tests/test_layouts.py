"""Checkpoints as they are on disk: every name prefix and per-expert layout mlx-lm's sanitize
accepts loads in flashmoe and matches mlx-lm on the same directory."""
from __future__ import annotations

import pytest

from tests.layouts import MIXTRAL_NAMES, prefix, rewrite, unstack
from tests.reference import flashmoe_greedy, mlx_lm_greedy
from tests.reference import assert_same
from tests.test_parity import PROMPTS

STEPS = 6
LAYOUTS = {
    "qwen3_5_moe:model.language_model": ("qwen3_5_moe", prefix("language_model.model.",
                                                                "model.language_model.")),
    "qwen3_5_moe:bare model.layers": ("qwen3_5_moe", prefix("language_model.", "")),
    "mixtral:per-expert w1/w2/w3": ("mixtral", unstack(MIXTRAL_NAMES)),
    "qwen2_moe:per-expert": ("qwen2_moe", unstack()),
    "deepseek_v3:per-expert": ("deepseek_v3", unstack()),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
async def test_layout_matches_mlx_lm(tiny, tmp_path, layout):
    family, rename = LAYOUTS[layout]
    src = tiny(family)
    path = rewrite(src, tmp_path / "ckpt", rename)
    ref = mlx_lm_greedy(path, PROMPTS[20], STEPS)
    assert_same(mlx_lm_greedy(src, PROMPTS[20], STEPS), ref)  # the rewrite kept the model
    got = await flashmoe_greedy(path, PROMPTS[20], STEPS, io_split=3)
    assert_same(ref, got)
    if "per-expert" in layout:  # each expert part is its own tensor: one range per expert
        le = next(iter(got[2].resident.experts.values()))
        assert all(len(src) == le.num_experts for src in le.sources)
