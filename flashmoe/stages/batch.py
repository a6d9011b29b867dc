"""One decode step for B sequences at once, exact per sequence.

Each sequence keeps its own mlx-lm cache (KV or Gated DeltaNet state): its attention runs as
its own small graph, all B of them in the layer's one device trip, with no padding and no
shared batch cache. Their MLP-input rows are then stacked [B, 1, D] and go through the
pipeline's own router → expert-fetch (the union, each expert read once) → expert-compute
(one gather_qmm over every row) → head. Every one of those ops is row-wise, and MLX's CPU
quantized matmuls give a row the same bits whatever M is (tests/test_batch.py measures it),
so a sequence's logits do not depend on its batch mates.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from flashmoe.stages.messages import Attended, StepStats
from flashmoe.stages.pipeline import Pipeline, StepState


class BatchStep:
    """Decode one token for each of B sequences through one Pipeline's stages."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline

    async def forward(self, tokens: Sequence[int], caches: Sequence[list[Any]],
                      stats: StepStats, speculate: bool = False) -> mx.array:
        """Logits [B, 1, V] for token b appended to cache b (each cache advances by one).

        The caller holds the model's step lock. One StepState carries the batch's stats and
        slot grants; the caches stay per sequence (the state's own cache is unused).
        speculate: try the whole batch's token at once (stages/speculate.py)."""
        p, fam, model = self.p, self.p.r.family, self.p.r.model
        step = StepState([], stats, speculate=speculate)
        x0 = await p.embed(list(tokens))  # [1, B, D]
        x0 = await p.worker.build(lambda: x0.reshape(len(tokens), 1, -1))  # [B, 1, D]
        masks = await p.worker.build(
            lambda: [fam.masks(model, x0[b:b + 1], c) for b, c in enumerate(caches)])
        attend = lambda i, layer, x_fn: partial(  # noqa: E731 - layer i's attention builder
            self._attend, i, layer, x_fn, [m[i] for m in masks], [c[i] for c in caches])
        start = 0
        if p.speculates(step, 1, [c for cache in caches for c in cache]):
            by_layer = [[cache[i] for cache in caches] for i in range(len(p.layers))]
            got = await p.speculator(step, x0, attend, by_layer)
            if got.logits is not None:
                return got.logits
            start, x0 = got.layer, got.x
        try:
            x_fn = await p.through_layers(step, x0, attend, start)
            return await p.head_logits(step, x_fn)
        finally:
            p.release(step)

    def _attend(self, index: int, layer: nn.Module, x_fn: Callable[[], mx.array],
                masks: list[Any], caches: list[Any]) -> Attended:
        """Each sequence's attention on its own row and cache; rows stacked again."""
        x = x_fn()  # [B, 1, D]
        fam = self.p.r.family
        h = mx.concatenate([fam.attention(layer, x[b:b + 1], m, c)
                            for b, (m, c) in enumerate(zip(masks, caches))], axis=0)
        return Attended(index, h, fam.mlp_input(layer, h))
