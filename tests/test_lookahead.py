"""The next decode step built and started before this one's routing is checked
(stages/speculate.py, Ahead; greedy sampling only): every step's logits and token against
mlx-lm, with the next step kept, undone after a miss part-way, and under interleaved sessions."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.engine import Engine, EngineOptions
from flashmoe.engine.session import Session
from tests.parity import (Trace, assert_exact, budget_for, flashmoe_trace, mlx_lm_trace,
                          record_forward, step_counts)

FAMILIES = ["qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral", "qwen2_moe"]
PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]
STEPS = 24


async def greedy_trace(path, n: int = STEPS, **opts) -> tuple[Trace, Engine]:
    """The default (greedy, pure) sampler, so steps sample in their own trip and look ahead;
    every decode step's log-probabilities recorded as mlx-lm's sampler sees them."""
    return await flashmoe_trace(path, PROMPT, n, greedy=True, **opts)


def _ahead_steps(engine) -> tuple[int, int]:
    return step_counts(engine, "built_ahead")


@pytest.mark.parametrize("family", FAMILIES)
async def test_steps_built_ahead_are_exact(tiny, family):
    path = tiny(family)
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, engine = await greedy_trace(path, cache_budget_gb=1.0)
    assert_exact(ref, got)
    used, _ = _ahead_steps(engine)
    assert used >= STEPS // 2, f"only {used} steps were built ahead"


@pytest.mark.parametrize("family", ["qwen3_5_moe", "mixtral"])
async def test_a_miss_undoes_the_step_built_ahead(tiny, family, monkeypatch):
    """Every step tries whole-token (a small pool: most miss part-way), so the next step,
    already built on top of this one's cache updates, is undone again and again."""
    from flashmoe.stages.speculate import Speculator

    monkeypatch.setattr(Session, "warm", property(lambda self: True, lambda self, v: None),
                        raising=False)
    undone = []
    real = Speculator.discard
    monkeypatch.setattr(Speculator, "discard", staticmethod(lambda a: (undone.append(a),
                                                                      real(a))))
    path = tiny(family)
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, engine = await greedy_trace(path, cache_budget_gb=budget_for(path, 40))
    assert_exact(ref, got)
    _, missed = _ahead_steps(engine)
    assert missed >= 3 and len(undone) >= 3, (missed, len(undone))


async def test_interleaved_sessions_with_steps_built_ahead(tiny):
    """Two greedy sessions stepping in turn on one model: each one's step built ahead is
    undone when the other steps, and both give their solo tokens."""
    path = tiny("qwen3_5_moe")
    engine = await Engine.open(path, EngineOptions(device="cpu", cache_budget_gb=1.0),
                               tokenizer=False)
    prompts = [PROMPT, PROMPT[::-1]]
    try:
        solo = []
        for p in prompts:
            solo.append([ev.token_id async for ev in engine.generate(p, 12)])
        gens = [engine.session().generate(p, 12) for p in prompts]
        both: list[list[int]] = [[], []]
        for _ in range(12):
            for i, g in enumerate(gens):
                both[i].append((await g.__anext__()).token_id)
    finally:
        await engine.aclose()
    assert both == solo


async def test_a_step_of_another_token_undoes_the_step_built_ahead(tiny):
    """Teacher forcing through Session.step: each step is built ahead from the sampled token,
    but the next step feeds another one, so the step built ahead must be undone."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    path = tiny("qwen3_5_moe")
    forced = [17, 3, 250, 99, 8, 401, 12, 77]
    model, _ = load(str(path))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([PROMPT[:-1]]), cache=cache))
    ref = []
    for tok in [PROMPT[-1], *forced]:
        last = model(mx.array([[tok]]), cache=cache)[:, -1, :]
        ref.append(np.array((last - mx.logsumexp(last, axis=-1, keepdims=True))
                            .astype(mx.float32)).reshape(-1))

    seen: list[np.ndarray] = []
    engine = await Engine.open(path, EngineOptions(device="cpu", cache_budget_gb=1.0),
                               tokenizer=False)
    record_forward(engine, seen)
    try:
        session = engine.session()
        await session.prefill(PROMPT)
        built = 0
        for tok in [PROMPT[-1], *forced]:
            _, stats = await session.step([tok], lookahead=True)
            built += stats.extra.get("built_ahead", 0)
    finally:
        await engine.aclose()
    assert built == 0  # the sampled token was never the next one fed
    for i, (a, b) in enumerate(zip(ref, seen)):
        assert np.array_equal(a, b), f"step {i}: logits differ by {np.abs(a - b).max():.3g}"
    assert len(seen) == len(ref)


@pytest.mark.parametrize("family, slots", [("qwen3_5_moe", 60), ("mixtral", 40)])
async def test_a_step_built_ahead_that_misses_goes_on_layer_by_layer(tiny, family, slots,
                                                                     monkeypatch):
    """Pools that hold most of a token's experts: steps are built ahead and then, when used,
    route outside the slots part-way, rolling back to the state the last step left."""
    monkeypatch.setattr(Session, "warm", property(lambda self: True, lambda self, v: None),
                        raising=False)
    path = tiny(family)
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    got, engine = await greedy_trace(path, cache_budget_gb=budget_for(path, slots))
    assert_exact(ref, got)
    both = sum(1 for s in engine.totals.steps
               if s.extra.get("built_ahead") and "speculation_missed_at" in s.extra)
    assert both >= 2, f"only {both} steps built ahead then missed: the path was not tested"
