"""qwen3_moe: softmax → top-k → optional renormalisation; no shared expert."""
from __future__ import annotations

import mlx.core as mx

from flashmoe.models.base import Family


class Qwen3Moe(Family):
    model_types = ("qwen3_moe",)

    def combine(self, y: mx.array, scores: mx.array, shared: mx.array | None) -> mx.array:
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
