"""A Session: one generation's state on a shared Model (KV cache, sampler, stats).

    session = model.session()
    async for ev in session.generate(model.encode("Hello"), max_tokens=32):
        print(model.decode([ev.token_id]), end="")

Any number of sessions may be alive on one model; their steps take turns (the model's step
lock), and each gives the tokens it would give alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import mlx.core as mx
import numpy as np

from flashmoe.errors import ConfigError
from flashmoe.stages.messages import StepStats
from flashmoe.stages.observer import ReadObserver
from flashmoe.stages.pipeline import StepState
from flashmoe.stages.sampling import Sampler, make_sampler

PREFILL_STEP = 2048  # mlx-lm generate_step's prefill_step_size (same splits, same kernels)

if TYPE_CHECKING:
    from flashmoe.engine.model import Model


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and what producing it cost."""

    token_id: int
    position: int
    stats: dict
    elapsed_s: float


@dataclass(slots=True)
class Totals:
    """Running sums over a session's steps, for the run summary."""

    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: list[StepStats] = field(default_factory=list)

    def add(self, prompt: bool, n_ids: int, seconds: float, stats: StepStats) -> None:
        if prompt:
            self.prompt_tokens, self.prompt_s = self.prompt_tokens + n_ids, self.prompt_s + seconds
        else:
            self.decode_tokens, self.decode_s = self.decode_tokens + 1, self.decode_s + seconds
        self.steps.append(stats)


class Session:
    """Per-generation state; the model's weights, slots, I/O and MLX thread are shared."""

    def __init__(self, model: Model, sampler: Sampler | None = None,
                 observer: ReadObserver | None = None, read_experts: bool = True,
                 totals: Totals | None = None) -> None:
        self.model = model
        self.sampler = sampler or make_sampler()
        self.observer, self.read_experts = observer, read_experts
        self.totals = totals if totals is not None else Totals()
        self.cache: list[Any] = model.new_cache()
        self.warm = True  # the last step read no expert: try the whole next token at once

    def reset(self) -> None:
        """Forget the context (a fresh KV cache); totals keep running."""
        self.cache = self.model.new_cache()

    async def step(self, ids: Sequence[int], stats: StepStats | None = None,
                   lookahead: bool = False) -> tuple[int, StepStats]:
        """Run `ids` after the context and sample the next token. lookahead: another decode
        step follows (generate's), so a whole-token step may start it before this one is
        checked (stages/speculate.py, Ahead)."""
        stats = stats or StepStats()
        state = self._state(self.cache, stats)
        state.speculate = self.warm
        if getattr(self.sampler, "pure", False):  # greedy: sampled in the step's own trip
            state.sampler, state.lookahead = self.sampler, lookahead
        async with self.model.step_lock:
            logits = await self.model.pipeline.forward(list(ids), state)
            tok = state.token if state.token is not None else \
                await self.model.pipeline.sample(logits, self.sampler, stats)
        self.warm = stats.read_nothing
        return tok, stats

    async def prefill(self, ids: Sequence[int], stats: StepStats | None = None) -> None:
        """Run all of `ids` but the last into the context, in mlx-lm's prefill steps.

        mlx-lm's generate_step runs a prompt exactly so (the last token then runs as the first
        decode step); on GPU backends a kernel's rounding depends on the call's shape, so only
        the same splits give the same bits."""
        stats, ids = stats or StepStats(), list(ids)
        while len(ids) > 1:
            n = min(PREFILL_STEP, len(ids) - 1)
            async with self.model.step_lock:
                await self.model.pipeline.forward(ids[:n], self._state(self.cache, stats),
                                                  head=False)
            ids = ids[n:]

    async def generate(self, prompt: Sequence[int], max_tokens: int,
                       stop: Sequence[int] = ()) -> AsyncIterator[TokenEvent]:
        """The prompt as mlx-lm runs it (prefill, then its last token), then one token per
        step; yields as tokens arrive."""
        if max_tokens < 1:
            raise ConfigError(f"max_tokens={max_tokens} must be at least 1")
        if not prompt:
            raise ConfigError("prompt is empty (0 tokens); give some text, e.g. prompt=\"Hello\"")
        ids, t_start = list(prompt), time.perf_counter()
        for n in range(max_tokens):
            t0 = time.perf_counter()
            stats = StepStats()
            if n == 0:
                await self.prefill(ids, stats)
            tok, stats = await self.step(ids[-1:], stats, lookahead=n + 1 < max_tokens)
            self.totals.add(n == 0, len(ids), time.perf_counter() - t0, stats)
            yield TokenEvent(tok, len(prompt) + n, stats.as_dict(), time.perf_counter() - t_start)
            if tok in stop:
                return
            ids = [tok]

    async def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits for every position of `ids` [L, V] (float32) on a fresh context, accounted
        as prompt tokens (tests, ppl and KL); the session's own context is untouched."""
        stats, t0 = StepStats(), time.perf_counter()
        async with self.model.step_lock:
            state = self._state(self.model.new_cache(), stats)
            out = await self.model.pipeline.forward(list(ids), state, all_logits=True)
            (arr,) = await self.model.worker.numpy(lambda: (out[0].astype(mx.float32),))
        self.totals.add(True, len(ids), time.perf_counter() - t0, stats)
        return arr

    def _state(self, cache: list[Any], stats: StepStats) -> StepState:
        return StepState(cache, stats, self.observer, self.read_experts)
