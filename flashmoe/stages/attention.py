"""AttentionStage: a layer's attention (or Gated DeltaNet) block, with mlx-lm's modules."""
from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from flashmoe.models import Family
from flashmoe.stages.messages import Attended


class AttentionStage:
    """Pure graph building, run inside the router's device trip (one trip per layer)."""

    def __init__(self, family: Family) -> None:
        self.family = family

    def build(self, index: int, layer: nn.Module, x_fn: Callable[[], mx.array], mask: Any,
              cache: Any) -> Attended:
        """x_fn() is the previous layer's (unevaluated) output; call exactly once per layer."""
        h = self.family.attention(layer, x_fn(), mask, cache)
        return Attended(index, h, self.family.mlp_input(layer, h))
