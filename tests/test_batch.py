"""The batched decode step is exact: a greedy sequence's tokens do not depend on its batch."""
from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from flashmoe.engine import Engine, EngineOptions
from flashmoe.serve.runner import BatchRunner
from flashmoe.serve.sampler import SeqSampler
from flashmoe.serve.sequence import Sequence
from tests.reference import flashmoe_greedy

STEPS = 12
DEVICE = os.environ.get("FLASHMOE_TEST_DEVICE", "cpu")
FAMILIES = ["qwen3_5_moe", "qwen3_next", "qwen3_moe", "mixtral", "qwen2_moe"]


def prompts(n: int) -> list[list[int]]:
    """n prompts of different lengths (1 .. 3n tokens)."""
    rng = np.random.default_rng(n)
    return [[int(t) for t in rng.integers(3, 400, size=1 + 3 * i)] for i in range(n)]


class _NoText:
    def reset(self): pass
    def add_token(self, t): pass
    def finalize(self): pass
    last_segment = ""


async def run_batched(engine: Engine, prompts: list[list[int]], joins: list[int], steps: int,
                      chunk: int = 512, compute: str = "auto") -> list[list[int]]:
    """Sequence i joins at decode step joins[i] (an exact prefill, then the batch)."""
    runner = BatchRunner(engine, prefill_chunk=chunk, compute=compute)
    seqs = [Sequence(f"r{i}", p, steps, SeqSampler(), _NoText()) for i, p in enumerate(prompts)]
    active: list[Sequence] = []
    t = 0
    while any(len(s.generated) < steps for s in seqs):
        for s, j in zip(seqs, joins):
            if j == t:
                while not (await runner.prefill(s))[0]:
                    pass
                active.append(s)
        live = [s for s in active if len(s.generated) < steps]
        if live:
            toks, rep = await runner.decode(live)
            assert rep.batch == len(live)
            for s, tok in zip(live, toks):
                s.accept(tok)
        t += 1
    return [s.generated for s in seqs]


@pytest.mark.parametrize("family", FAMILIES)
async def test_batch_equals_solo(tiny, family):
    path = tiny(family)
    ps = prompts(8)
    solo = [(await flashmoe_greedy(path, p, STEPS, io_split=2))[0] for p in ps]
    engine = await Engine.open(path, EngineOptions(io_split=2, device=DEVICE), tokenizer=False)
    try:
        for size, joins in ((1, [0]), (3, [0, 2, 5]), (8, [0, 0, 1, 3, 3, 4, 7, 9])):
            got = await run_batched(engine, ps[:size], joins, STEPS)
            assert got == solo[:size], f"batch of {size}"
        assert all(p.free_slots() == p.n for p in engine.unique_pools())  # pins back to zero
    finally:
        await engine.aclose()


async def test_chunked_prefill_same_tokens(tiny):
    """A prompt fed in chunks of 5 (mlx-lm prefills in chunks of 2048) decodes the same tokens
    on the CPU; on a GPU only mlx-lm's own splits are bit-exact (task.prefill_chunk=2048)."""
    path = tiny("qwen3_5_moe")
    p = prompts(8)[-1]  # 22 tokens
    solo = (await flashmoe_greedy(path, p, STEPS))[0]
    engine = await Engine.open(path, EngineOptions(device=DEVICE), tokenizer=False)
    try:
        assert (await run_batched(engine, [p], [0], STEPS, chunk=5))[0] == solo
    finally:
        await engine.aclose()


def test_quantized_matmul_rows_independent_of_m():
    """The fact the batch step rests on: a row's bits do not depend on how many rows go along."""
    mx.random.seed(0)
    w = mx.random.normal((256, 512)) * 0.05
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((8, 512))
    whole = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    for i in range(8):
        one = mx.quantized_matmul(x[i:i + 1], wq, s, b, transpose=True, group_size=64, bits=4)
        assert mx.array_equal(whole[i:i + 1], one).item()
    inds = mx.array(np.random.default_rng(0).integers(0, 4, size=(8, 2)).astype(np.uint32))
    we = mx.random.normal((4, 256, 512)) * 0.05
    eq, es, eb = mx.quantize(we, group_size=64, bits=4)
    xe = mx.expand_dims(x, (-2, -3))
    g = mx.gather_qmm(xe, eq, es, eb, rhs_indices=inds, transpose=True, group_size=64, bits=4)
    for i in range(8):
        one = mx.gather_qmm(xe[i:i + 1], eq, es, eb, rhs_indices=inds[i:i + 1], transpose=True,
                            group_size=64, bits=4)
        assert mx.array_equal(g[i:i + 1], one).item()


async def test_proxied_family_steps_one_at_a_time_exactly(tiny):
    """A family run through mlx-lm's own forward (olmoe) is not batched: the runner steps its
    sequences one by one, still giving each its solo tokens."""
    path = tiny("olmoe")
    ps = prompts(3)
    solo = [(await flashmoe_greedy(path, p, STEPS))[0] for p in ps]
    engine = await Engine.open(path, EngineOptions(device=DEVICE), tokenizer=False)
    try:
        assert not BatchRunner(engine).batched
        assert await run_batched(engine, ps, [0, 1, 3], STEPS) == solo
    finally:
        await engine.aclose()


@pytest.mark.parametrize("family", ["qwen3_5_moe", "mixtral"])
async def test_per_sequence_compute_equals_solo(tiny, family):
    """task.batch_compute=per_sequence (the GPU default): each row its own one-row forward;
    the batch's experts are read once per step and served to later rows from the cache."""
    path = tiny(family)
    ps = prompts(3)
    solo = [(await flashmoe_greedy(path, p, STEPS, io_split=2))[0] for p in ps]
    engine = await Engine.open(path, EngineOptions(io_split=2, device=DEVICE), tokenizer=False)
    try:
        runner = BatchRunner(engine, compute="per_sequence")
        assert not runner.batched
        assert await run_batched(engine, ps, [0, 1, 2], STEPS, compute="per_sequence") == solo
    finally:
        await engine.aclose()


async def test_auto_compute_is_joint_only_where_rows_are_exact(tiny):
    engine = await Engine.open(tiny("qwen3_moe"), EngineOptions(device=DEVICE), tokenizer=False)
    try:
        gpu = engine.pipeline.compute.same_shapes
        assert BatchRunner(engine).batched == (not gpu)
        assert BatchRunner(engine, compute="joint").batched
        assert not BatchRunner(engine, compute="per_sequence").batched
    finally:
        await engine.aclose()
