"""Layers whose experts are all cached run in one MLX-thread job (stages/cached_run.py), and a
decode token whose experts are all cached as one trip (stages/speculate.py): the same bits as
mlx-lm when every layer hits, and when hits and misses alternate within a token (the job
hands a missing layer to the fetch stage and resumes after it)."""
from __future__ import annotations

import contextlib
import os
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.engine import Engine, EngineOptions
from flashmoe.engine.session import Session
from tests.parity import Trace, assert_exact, budget_for

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150, 9, 480, 33, 120, 8, 200, 61, 3]
STEPS = 16


async def warm_then_trace(path, forget_every: int = 0, **opts) -> tuple[Trace, list, Engine]:
    """Decode the stream once (filling the slots), then trace it again: (trace, the second
    pass's step stats, engine). forget_every=n: the cache is emptied after every n-th token
    of the second pass, and every token tries the whole-token trip (those that miss roll
    back)."""
    opts.setdefault("device", os.environ.get("FLASHMOE_TEST_DEVICE", "cpu"))
    engine = await Engine.open(path, EngineOptions(**opts), tokenizer=False)
    seen: list[np.ndarray] = []
    staged = engine.pipeline.experts  # layers handed to the fetch and compute stages

    async def counted(step, *args):
        step.stats.extra["staged_layers"] = step.stats.extra.get("staged_layers", 0) + 1
        return await staged(step, *args)

    engine.pipeline.experts = counted

    def recording(logprobs: mx.array) -> mx.array:
        seen.append(np.array(logprobs.astype(mx.float32)).reshape(-1))
        if forget_every and len(seen) % forget_every == 0:
            engine.reset_cache()  # between steps: no slot is pinned
        return mx.argmax(logprobs, axis=-1)

    always = property(lambda self: True, lambda self, v: None)  # every token tries whole
    try:
        _ = [ev async for ev in engine.generate(PROMPT, STEPS)]
        prompt_logits = await engine.logits(PROMPT)
        n = len(engine.totals.steps)
        with mock.patch.object(Session, "warm", always, create=True) if forget_every \
                else contextlib.nullcontext():
            tokens = [ev.token_id async for ev in engine.generate(PROMPT, STEPS,
                                                                  sampler=recording)]
    finally:
        await engine.aclose()
    return Trace(prompt_logits, tokens, seen), engine.totals.steps[n:], engine


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe", "qwen3_next"])
async def test_every_expert_cached_is_exact(tiny, reference, family):
    path = tiny(family)
    got, steps, _ = await warm_then_trace(path, cache_budget_gb=budget_for(path, 1000))
    assert all(s.experts_fetched == 0 and s.experts_hit > 0 for s in steps)
    assert not any(s.extra.get("staged_layers") for s in steps)
    assert all(s.extra.get("speculated_layers") for s in steps[1:])  # one trip per token
    assert not any("speculation_missed_at" in s.extra for s in steps)
    assert_exact(reference(path, PROMPT, STEPS), got)


async def test_hits_and_misses_in_one_token_are_exact(tiny, reference):
    """48 slots for 4 layers of 16 experts: within a token some layers are all cached (run by
    the job), others read (handed to the stages), and the job resumes after them."""
    path = tiny("qwen3_5_moe")
    got, steps, _ = await warm_then_trace(path, cache_budget_gb=budget_for(path, 48))
    assert any(0 < s.extra.get("staged_layers", 0) < 4 for s in steps[1:])
    assert_exact(reference(path, PROMPT, STEPS), got)


@pytest.mark.parametrize("dtype", [None, "float32"])
async def test_experts_in_the_host_tier_are_copied_in_by_the_job_exactly(tiny, reference, dtype):
    """Two tiers: 24 slots for 4 layers of 16 experts, every other expert in the host tier
    once warm. A layer whose missing experts are all in the tier reads nothing, so the job
    promotes them itself: no layer goes to the stages, and the bits are mlx-lm's (float32
    activations over bf16 scales: slots widened from the promoted bytes, as one tier
    holding every expert gives them)."""
    path = tiny("qwen3_5_moe", dtype=mx.bfloat16)
    got, steps, _ = await warm_then_trace(path, cache_budget_gb=budget_for(path, 24),
                                          cache_host_budget_gb=1.0, dtype=dtype)
    assert all(s.experts_fetched == 0 for s in steps)
    assert sum(s.extra.get("experts_host_hit", 0) for s in steps) > 0
    assert not any(s.extra.get("staged_layers") for s in steps)
    if dtype is None:
        assert_exact(reference(path, PROMPT, STEPS), got)
    else:
        want, _, _ = await warm_then_trace(path, cache_budget_gb=budget_for(path, 64),
                                           dtype=dtype)
        assert_exact(want, got)


async def test_a_failed_copy_in_inside_the_job_leaves_no_slot_claiming_it(tiny, monkeypatch):
    """The job's copy in from the host tier fails (a CUDA error at its synchronise): the
    error reaches the caller, and neither the promoted experts nor the grant's pins stay."""
    from flashmoe.stages import cached_run

    path = tiny("qwen3_5_moe")
    engine = await Engine.open(path, EngineOptions(
        device=os.environ.get("FLASHMOE_TEST_DEVICE", "cpu"),
        cache_budget_gb=budget_for(path, 24), cache_host_budget_gb=1.0), tokenizer=False)
    failed = []

    def broken(pool, grant, stats, read):
        failed.append((pool, grant))
        raise RuntimeError("cuStreamSynchronize returned CUDA error 700")

    try:
        _ = [ev async for ev in engine.generate(PROMPT, STEPS)]  # warm: both tiers hold all
        monkeypatch.setattr(cached_run, "_promoted", broken)
        with pytest.raises(RuntimeError, match="CUDA error 700"):
            _ = [ev async for ev in engine.generate(PROMPT, STEPS)]
    finally:
        await engine.aclose()
    (pool, grant), = failed
    assert grant.promoted and all(pool._owner[s] is None for _, s in grant.promoted)
    assert pool.free_slots() == pool.n  # every pin released


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe"])
async def test_a_whole_token_try_that_missed_rolls_back_exactly(tiny, reference, family):
    """The cache emptied every 3rd token: the next token's one-graph try routes to uncached
    experts, its KV / Gated DeltaNet updates are undone and it runs again layer by layer."""
    path = tiny(family)
    got, steps, _ = await warm_then_trace(path, forget_every=3,
                                          cache_budget_gb=budget_for(path, 1000))
    assert sum("speculation_missed_at" in s.extra for s in steps) >= 5
    assert any(s.extra.get("speculated_layers") and "speculation_missed_at" not in s.extra
               for s in steps)
    assert_exact(reference(path, PROMPT, STEPS), got)


async def test_every_expert_cached_in_several_pools_is_exact(tiny, reference, monkeypatch):
    """Pools split under the slot-array cap: each layer's slot ids index its own pool."""
    import flashmoe.engine.model as engine_mod

    monkeypatch.setattr(engine_mod.Model, "_slot_cap", lambda self, spec: 16)
    path = tiny("qwen3_5_moe")
    got, steps, engine = await warm_then_trace(path, cache_budget_gb=budget_for(path, 64))
    assert len(engine.unique_pools()) == 4
    assert all(s.extra.get("speculated_layers") and "speculation_missed_at" not in s.extra
               for s in steps[1:])
    assert_exact(reference(path, PROMPT, STEPS), got)
