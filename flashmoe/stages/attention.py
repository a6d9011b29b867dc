"""AttentionStage: a layer's attention (or Gated DeltaNet) block, with mlx-lm's modules."""
from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from flashmoe.models import Family
from flashmoe.runtime.mlx_worker import MlxWorker
from flashmoe.stages.messages import Attended, StepStats


class AttentionStage:
    def __init__(self, worker: MlxWorker, family: Family) -> None:
        self.worker, self.family = worker, family

    async def __call__(self, index: int, layer: nn.Module, x: mx.array, mask: Any, cache: Any,
                       stats: StepStats) -> Attended:
        # built, not evaluated: the router's evaluation runs it in the same device trip
        t0 = time.perf_counter()
        h, xn = await self.worker.build(self._build, layer, x, mask, cache)
        stats.attention_ms += (time.perf_counter() - t0) * 1e3
        return Attended(index, h, xn)

    def _build(self, layer: nn.Module, x: mx.array, mask: Any, cache: Any):
        h = self.family.attention(layer, x, mask, cache)
        return h, self.family.mlp_input(layer, h)
