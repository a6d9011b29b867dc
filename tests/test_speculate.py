"""The whole-token decode step (stages/speculate.py) against mlx-lm, every logit of every step.

Served whole (every routed expert already in a slot), served in part (a layer routes outside
the slots: the caches of the later layers are rolled back and the per-layer path goes on from
there), and a deliberately wrong slot table, which these same checks must catch.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashmoe.engine.session import Session
from flashmoe.stages.speculate import Speculator
from tests.parity import (assert_exact, budget_for, first_difference, flashmoe_trace,
                          mlx_lm_trace, step_counts)

FAMILIES = ["qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral", "qwen2_moe"]
PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]
STEPS = 24


def _counts(engine) -> tuple[int, int]:
    """(layers served whole-token, steps that fell back to the per-layer path part-way)."""
    return step_counts(engine, "speculated_layers")


@pytest.mark.parametrize("family", FAMILIES)
async def test_warm_cache_serves_whole_tokens_exactly(tiny, family):
    path = tiny(family)
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, engine = await flashmoe_trace(path, PROMPT, STEPS, cache_budget_gb=1.0)
    assert_exact(ref, got)
    served, _ = _counts(engine)
    assert served >= STEPS, f"only {served} layers were served whole-token"


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe", "mixtral"])
async def test_a_miss_part_way_rolls_back_and_stays_exact(tiny, family, monkeypatch):
    """Every step tries (a small pool: most steps miss somewhere), so the roll-back of the
    later layers' KV and Gated DeltaNet caches runs many times."""
    monkeypatch.setattr(Session, "warm", property(lambda self: True, lambda self, v: None),
                        raising=False)
    path = tiny(family)
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, engine = await flashmoe_trace(path, PROMPT, STEPS,
                                       cache_budget_gb=budget_for(path, 40))
    assert_exact(ref, got)
    served, missed = _counts(engine)
    assert missed >= 3, f"only {missed} steps fell back part-way: the roll-back was not tested"
    assert served >= 1


@pytest.mark.parametrize("every", [0, 3])
async def test_fewer_evaluations_per_token_stay_exact(tiny, every, monkeypatch):
    """The GPU's setting (the token in one evaluation) and every third layer, on the CPU:
    served whole and rolled back part-way alike."""
    import flashmoe.stages.speculate as speculate

    monkeypatch.setattr(speculate, "EVAL_EVERY", every)
    monkeypatch.setattr(Session, "warm", property(lambda self: True, lambda self, v: None),
                        raising=False)
    path = tiny("qwen3_5_moe")
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, engine = await flashmoe_trace(path, PROMPT, STEPS,
                                       cache_budget_gb=budget_for(path, 40))
    assert_exact(ref, got)
    assert engine.pipeline.speculator.eval_every == every
    served, missed = _counts(engine)
    assert served >= 1 and missed >= 3, (served, missed)


async def test_a_wrong_slot_table_is_caught(tiny, monkeypatch):
    """One expert of one layer served from another expert's slot: the trace must differ."""
    real = Speculator._step

    def swapped(self, x0, attend, where, *rest):
        w = dict(where)
        layer = min(w)
        table = w[layer].copy()
        held = np.flatnonzero(table >= 0)
        if len(held) >= 2:
            table[held[0]], table[held[1]] = table[held[1]], table[held[0]]
        w[layer] = table
        return real(self, x0, attend, w, *rest)

    monkeypatch.setattr(Speculator, "_step", swapped)
    path = tiny("qwen3_moe")
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, _ = await flashmoe_trace(path, PROMPT, STEPS, cache_budget_gb=1.0)
    assert first_difference(ref, got) is not None, "a swapped expert went unnoticed"


@pytest.mark.parametrize("family", ["qwen3_5_moe", "mixtral"])
async def test_a_batch_served_whole_token_equals_solo(tiny, family, monkeypatch):
    """task=serve's batched step through the whole-token trip (each sequence's own caches
    rolled back on a miss): every sequence's tokens are its solo tokens."""
    from flashmoe.engine import Engine, EngineOptions
    from tests.reference import flashmoe_greedy
    from tests.test_batch import prompts, run_batched

    outcomes: list[bool] = []
    real = Speculator.__call__

    async def counting(self, *args, **kwargs):
        got = await real(self, *args, **kwargs)
        outcomes.append(got.logits is not None)
        return got

    monkeypatch.setattr(Speculator, "__call__", counting)
    path = tiny(family)
    ps = prompts(4)
    solo = [(await flashmoe_greedy(path, p, STEPS, cache_policy="none"))[0] for p in ps]
    outcomes.clear()
    engine = await Engine.open(path, EngineOptions(device="cpu", cache_budget_gb=1.0),
                               tokenizer=False)
    try:
        assert await run_batched(engine, ps, [0, 0, 2, 5], STEPS) == solo
    finally:
        await engine.aclose()
    assert sum(outcomes) >= STEPS // 2, f"{sum(outcomes)} of {len(outcomes)} served whole"
    assert not all(outcomes), "no batched step fell back part-way: the roll-back was not run"
