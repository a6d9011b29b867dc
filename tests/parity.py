"""Full-trace parity: every prompt position's logits and every decode step's log-probabilities,
flashmoe streaming against mlx-lm resident, compared bit for bit.

Measured on the CPU backend (MLX 0.32.4, mlx-lm 0.32.2), every family, f32 / bf16 / bf16
upcast, 2-bit experts, lowered K, every lever, chunked prompts: the largest difference is
exactly 0.0. So the comparison is `np.array_equal`, no tolerance (README, "Exactness").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from flashmoe.engine import Engine, EngineOptions
from tests import reference

GIB = 2**30


@dataclass(frozen=True)
class Trace:
    """What a greedy run produced, everything the parity checks compare."""

    prompt_logits: np.ndarray  # [L, V] float32: every prompt position, one pass
    tokens: list[int]  # greedy tokens
    step_logprobs: list[np.ndarray]  # per token: [V] float32, what the sampler saw

    def head(self, n: int) -> "Trace":
        return replace(self, tokens=self.tokens[:n], step_logprobs=self.step_logprobs[:n])


def mlx_lm_trace(path: Path, prompt: Sequence[int], n: int, upcast: bool = False) -> Trace:
    """mlx-lm resident: the prompt's logits in one call (as `engine.logits` runs it), and
    mlx-lm's own `generate_step`, greedy, yielding each step's log-probabilities (prefill of
    all tokens but the last, then one token per call). upcast: bf16 params widened to f32
    first (what flashmoe's hardware.dtype=float32 does)."""
    from mlx.utils import tree_map
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    if upcast:
        model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.bfloat16 else p,
                              model.parameters()))
    prompt_logits = np.array(model(mx.array([list(prompt)]))[0].astype(mx.float32))  # [L, V]
    tokens, steps = [], []
    for tok, logprobs in generate_step(mx.array(list(prompt)), model, max_tokens=n,
                                       sampler=lambda lp: mx.argmax(lp, axis=-1)):
        tokens.append(int(tok))
        steps.append(np.array(logprobs.astype(mx.float32)).reshape(-1))
    return Trace(prompt_logits, tokens, steps)


async def flashmoe_trace(path: Path, prompt: Sequence[int], n: int,
                         setup: Callable[[Engine], Any] | None = None, greedy: bool = False,
                         **opts: Any) -> tuple[Trace, Engine]:
    """flashmoe on the same checkpoint: `engine.logits(prompt)` in a fresh cache, then
    `engine.generate` with a sampler that records what it sees. `setup(engine)` runs right
    after open (fault injection, hostile slot pools). greedy: the default (pure) sampler
    instead, so whole-token steps sample in their own trip and build the next step ahead;
    each decode step's logits are recorded as the pipeline returns them. Returns the closed
    engine too."""
    opts.setdefault("device", os.environ.get("FLASHMOE_TEST_DEVICE", "cpu"))
    engine = await Engine.open(path, EngineOptions(**opts), tokenizer=False)
    seen: list[np.ndarray] = []

    def recording(logprobs: mx.array) -> mx.array:
        seen.append(np.array(logprobs.astype(mx.float32)).reshape(-1))
        return mx.argmax(logprobs, axis=-1)

    if greedy:
        record_forward(engine, seen)
    try:
        if setup is not None:
            setup(engine)
        prompt_logits = await engine.logits(list(prompt))
        seen.clear()
        tokens = [ev.token_id async for ev in engine.generate(
            list(prompt), n, sampler=None if greedy else recording)]
    finally:
        await engine.aclose()
    return Trace(prompt_logits, tokens, seen), engine


def record_forward(engine: Engine, seen: list[np.ndarray]) -> None:
    """Record every decode step's log-probabilities (as mlx-lm's sampler gets them) from
    what the engine's pipeline returns, on the MLX thread."""
    pipeline = engine.pipeline
    forward = pipeline.forward

    async def recording(ids, step, all_logits=False, head=True):
        out = await forward(ids, step, all_logits, head)
        if out is not None and not all_logits:
            def logprobs(out=out):
                last = out[:, -1, :]
                return ((last - mx.logsumexp(last, axis=-1, keepdims=True)).astype(mx.float32),)
            seen.append((await pipeline.worker.numpy(logprobs))[0].reshape(-1))
        return out

    pipeline.forward = recording


def first_difference(ref: Trace, got: Trace) -> str | None:
    """Where `got` first departs from `ref` (None: bit-identical)."""
    if got.prompt_logits.shape != ref.prompt_logits.shape:
        return f"prompt logits have shape {got.prompt_logits.shape}, want {ref.prompt_logits.shape}"
    for i, (a, b) in enumerate(zip(ref.prompt_logits, got.prompt_logits)):
        if not np.array_equal(a, b):
            return f"prompt position {i}: logits differ by up to {_gap(a, b)}"
    if len(got.step_logprobs) != len(ref.step_logprobs):
        return f"{len(got.step_logprobs)} decode steps, want {len(ref.step_logprobs)}"
    for i, (a, b) in enumerate(zip(ref.step_logprobs, got.step_logprobs)):
        if not np.array_equal(a, b):
            return f"step {i}: log-probabilities differ by up to {_gap(a, b)}"
    if got.tokens != ref.tokens:
        return f"tokens differ: {got.tokens} != {ref.tokens}"
    return None


def assert_exact(ref: Trace, got: Trace) -> None:
    diff = first_difference(ref, got)
    assert diff is None, f"flashmoe departs from mlx-lm at {diff}"


def _gap(a: np.ndarray, b: np.ndarray) -> str:
    gap = np.abs(a - b)
    if np.isnan(gap).all():
        return "NaN everywhere"
    return f"{np.nanmax(gap):.3g}" + (" (and NaN)" if np.isnan(gap).any() else "")


def expert_nbytes(path: Path) -> int:
    """Bytes of one routed expert of layer 0 (all tiny fixtures share one layout)."""
    return reference.expert_nbytes(path)[0]


def budget_for(path: Path, slots: int) -> float:
    """cache.budget_gb that buys exactly `slots` slots (one pool: one expert layout)."""
    return (slots + 0.5) * expert_nbytes(path) / GIB


def step_counts(engine: Engine, key: str) -> tuple[int, int]:
    """(the decode stat `key` summed over the engine's steps, steps that fell back to the
    per-layer path part-way)."""
    steps = engine.totals.steps
    return (sum(s.extra.get(key, 0) for s in steps),
            sum("speculation_missed_at" in s.extra for s in steps))
