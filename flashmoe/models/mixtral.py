"""mixtral: top-k on raw router logits, softmax over the k picked; no shared expert."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from flashmoe.models.base import Family


class Mixtral(Family):
    model_types = ("mixtral",)
    moe_attr = "block_sparse_moe"

    def num_experts(self, config: dict) -> int:
        return int(config["num_local_experts"])

    def route(self, block: nn.Module, xn: mx.array, k: int) -> tuple[mx.array, mx.array]:
        gates = block.gate(xn)
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1, precise=True)
        return inds, scores
