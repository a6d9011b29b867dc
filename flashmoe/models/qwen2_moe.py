"""qwen2_moe: softmax over all experts, top-k without renormalisation, gated shared expert."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from flashmoe.models.base import Family


class Qwen2Moe(Family):
    model_types = ("qwen2_moe",)

    def route(self, block: nn.Module, xn: mx.array, k: int) -> tuple[mx.array, mx.array]:
        gates = mx.softmax(block.gate(xn), axis=-1, precise=True)
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        return inds, mx.take_along_axis(gates, inds, axis=-1)
