"""One model, many sessions: interleaved generations each give the tokens they give alone."""
from __future__ import annotations

import asyncio
import os

import pytest

from flashmoe.engine import Engine, EngineOptions, Session
from flashmoe.stages.sampling import make_sampler

FAMILIES = ["qwen3_5_moe", "qwen3_moe", "qwen3_next", "mixtral", "qwen2_moe"]
PROMPT_A = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2]
PROMPT_B = [17, 480, 33]
STEPS = 12


async def _alone(session: Session, prompt: list[int]) -> list[int]:
    return [ev.token_id async for ev in session.generate(prompt, STEPS)]


async def _interleaved(a: Session, b: Session) -> tuple[list[int], list[int]]:
    """Step A, then B, then A, ...: each generator advanced by one token at a time."""
    gens = [a.generate(PROMPT_A, STEPS), b.generate(PROMPT_B, STEPS)]
    out: tuple[list[int], list[int]] = ([], [])
    for _ in range(STEPS):
        for gen, toks in zip(gens, out):
            toks.append((await gen.__anext__()).token_id)
    return out


async def _open(path, **opts) -> Engine:
    opts.setdefault("device", os.environ.get("FLASHMOE_TEST_DEVICE", "cpu"))
    return await Engine.open(path, EngineOptions(**opts), tokenizer=False)


@pytest.mark.parametrize("family", FAMILIES)
async def test_two_sessions_interleaved_match_alone(tiny, family):
    model = await _open(tiny(family), io_split=2)
    try:
        want_a = await _alone(model.session(), PROMPT_A)
        want_b = await _alone(model.session(), PROMPT_B)
        assert await _interleaved(model.session(), model.session()) == (want_a, want_b)
        # as concurrent tasks too: their steps take turns on the model's step lock
        got = await asyncio.gather(_alone(model.session(), PROMPT_A),
                                   _alone(model.session(), PROMPT_B))
        assert got == [want_a, want_b]
    finally:
        await model.aclose()


async def test_sessions_with_prefetch_and_a_small_cache_stay_exact(tiny):
    """Speculative reads and LRU evictions shared by two sessions change no token."""
    path = tiny("qwen3_moe")
    model = await _open(path, prefetch=True, cache_budget_gb=0.002)
    try:
        want = (await _alone(model.session(), PROMPT_A), await _alone(model.session(), PROMPT_B))
        assert await _interleaved(model.session(), model.session()) == want
    finally:
        await model.aclose()


async def test_a_sessions_sampler_and_stats_are_its_own(tiny):
    model = await _open(tiny("qwen3_moe"))
    try:
        greedy = model.session()
        want = await _alone(model.session(), PROMPT_A)
        hot = model.session(sampler=make_sampler(temperature=5.0))
        gens = [greedy.generate(PROMPT_A, STEPS), hot.generate(PROMPT_B, STEPS)]
        got = []
        for _ in range(STEPS):
            got.append((await gens[0].__anext__()).token_id)
            await gens[1].__anext__()
        assert got == want
        assert greedy.totals.prompt_tokens == len(PROMPT_A)
        assert hot.totals.prompt_tokens == len(PROMPT_B)
        assert greedy.totals.decode_tokens == hot.totals.decode_tokens == STEPS - 1
    finally:
        await model.aclose()
