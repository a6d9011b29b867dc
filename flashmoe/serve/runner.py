"""The model side of continuous batching: chunked exact prefill, the batched decode step,
per-sequence sampling. The scheduler calls it one step at a time and never touches MLX.

A sequence runs as a Session does alone: its prompt but the last token is prefilled (no lm
head) in steps of at most `prefill_chunk` tokens, then the last prompt token is its first
decode row, sampled for the first generated token.

How a decode step computes its B rows (`task.batch_compute`): `joint` stacks them through one
router call, one gather over every row and one head (MLX's CPU kernels give a row the same
bits whatever the row count: exact there, tests/test_batch.py); `per_sequence` runs each
sequence's own one-row forward, as it would alone, one after another, its experts read once
per step and then served to the later sequences from the slot cache. GPU kernels are chosen by
the call's row count (gather_qmm takes its qmm path from 8 (row, expert) pairs), so on GPU
backends only `per_sequence` is bit-exact against the solo run; `auto` (the default) picks
`joint` on the CPU and `per_sequence` on a GPU."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence as Seq

import mlx.core as mx

from flashmoe.engine import Model
from flashmoe.engine.session import PREFILL_STEP
from flashmoe.serve.sequence import Sequence
from flashmoe.stages.batch import BatchStep
from flashmoe.stages.messages import StepStats
from flashmoe.stages.pipeline import StepState


@dataclass(frozen=True, slots=True)
class StepReport:
    """One scheduler step's work, for metrics and the bench."""

    kind: str  # prefill | decode
    batch: int
    tokens: int  # prompt tokens consumed (prefill) or tokens generated (decode)
    seconds: float
    stats: StepStats


class BatchRunner:
    def __init__(self, model: Model, prefill_chunk: int = PREFILL_STEP,
                 compute: str = "auto") -> None:
        self.model, self.prefill_chunk = model, prefill_chunk
        self.step = BatchStep(model.pipeline)
        gpu = model.pipeline.compute.same_shapes  # kernels chosen by the call's shape
        # mlx-lm-forward families (proxied experts) step one sequence at a time
        self.batched = (model.resident.family.batchable and model.pipeline.proxied is None
                        and (compute == "joint" or (compute == "auto" and not gpu)))
        self.warm = True  # the last batched step read no expert: try the next one whole

    async def prefill(self, seq: Sequence) -> tuple[bool, StepReport]:
        """Feed the next chunk of seq's prompt (all but its last token); True once it is ready
        to decode (`seq.last` is then the prompt's last token)."""
        t0, stats = time.perf_counter(), StepStats()
        if seq.cache is None:
            seq.cache = self.model.new_cache()
        end = len(seq.prompt) - 1
        chunk = seq.prompt[seq.prefilled:min(seq.prefilled + self.prefill_chunk, end)]
        if chunk:
            async with self.model.step_lock:
                await self.model.pipeline.forward(chunk, StepState(seq.cache, stats), head=False)
            seq.prefilled += len(chunk)
        ready = seq.prefilled >= end
        if ready:
            seq.last = seq.prompt[-1]
        return ready, StepReport("prefill", 1, len(chunk), time.perf_counter() - t0, stats)

    async def decode(self, seqs: Seq[Sequence]) -> tuple[list[int], StepReport]:
        """One token for every sequence (each is ready and has a `last` token)."""
        t0, stats = time.perf_counter(), StepStats()
        async with self.model.step_lock:
            if self.batched:
                logits = await self.step.forward([s.last for s in seqs], [s.cache for s in seqs],
                                                 stats, self.warm)
                toks = await self.sample(seqs, logits, stats)
            else:
                toks = []
                for s in seqs:
                    state = StepState(s.cache, stats, speculate=self.warm)
                    logits = await self.model.pipeline.forward([s.last], state)
                    toks += await self.sample([s], logits, stats)
        self.warm = stats.read_nothing
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

        (toks,) = await self.model.worker.numpy(draw)
        stats.sampling_ms += (time.perf_counter() - t0) * 1e3
        return [int(t) for t in toks]
