"""The model side of continuous batching: chunked exact prefill, the batched decode step,
per-sequence sampling. The scheduler calls it one step at a time and never touches MLX."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence as Seq

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from flashmoe.engine import Engine
from flashmoe.serve.sequence import Sequence
from flashmoe.stages.batch import BatchStep
from flashmoe.stages.messages import StepStats


@dataclass(frozen=True, slots=True)
class StepReport:
    """One scheduler step's work, for metrics and the bench."""

    kind: str  # prefill | decode
    batch: int
    tokens: int  # prompt tokens consumed (prefill) or tokens generated (decode)
    seconds: float
    stats: StepStats


class BatchRunner:
    def __init__(self, engine: Engine, prefill_chunk: int = 512) -> None:
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self.step = BatchStep(engine.pipeline)

    async def prefill(self, seq: Sequence) -> tuple[int | None, StepReport]:
        """Feed the next chunk of seq's prompt; after the last chunk, its first token."""
        t0, stats = time.perf_counter(), StepStats()
        if seq.cache is None:
            seq.cache = await self.engine.worker.build(make_prompt_cache, self.engine.resident.model)
        chunk = seq.prompt[seq.prefilled:seq.prefilled + self.prefill_chunk]
        logits = await self.engine.pipeline.forward(chunk, seq.cache, stats)
        seq.prefilled += len(chunk)
        tok = None
        if seq.prefilled >= len(seq.prompt):
            (tok,) = await self.sample([seq], logits, stats)
        return tok, StepReport("prefill", 1, len(chunk), time.perf_counter() - t0, stats)

    async def decode(self, seqs: Seq[Sequence]) -> tuple[list[int], StepReport]:
        """One token for every sequence (each has been prefilled and has a `last` token)."""
        t0, stats = time.perf_counter(), StepStats()
        logits = await self.step.forward([s.last for s in seqs], [s.cache for s in seqs], stats)
        toks = await self.sample(seqs, logits, stats)
        for s in seqs:
            s.steps += 1
        return toks, StepReport("decode", len(seqs), len(seqs), time.perf_counter() - t0, stats)

    async def sample(self, seqs: Seq[Sequence], logits: mx.array, stats: StepStats) -> list[int]:
        """Each sequence's own sampler on its row of logits [B, L, V], in one device trip."""
        t0 = time.perf_counter()

        def draw():
            last = logits[:, -1, :]
            logprobs = last - mx.logsumexp(last, axis=-1, keepdims=True)  # as SamplingStage
            return (mx.concatenate([s.sampler(logprobs[b:b + 1]).reshape(1)
                                    for b, s in enumerate(seqs)]),)

        (toks,) = await self.engine.worker.numpy(draw)
        stats.sampling_ms += (time.perf_counter() - t0) * 1e3
        return [int(t) for t in toks]
