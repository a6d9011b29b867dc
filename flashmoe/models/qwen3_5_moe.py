"""qwen3_5_moe (Qwen3.5-397B-A17B): qwen3_next's blocks under a `language_model` wrapper."""
from __future__ import annotations

import mlx.nn as nn

from flashmoe.models.base import HybridFamily


class Qwen3_5Moe(HybridFamily):
    model_types = ("qwen3_5_moe",)

    def expert_prefix(self, model: nn.Module, index: int) -> str:
        return f"language_model.model.layers.{index}.mlp.switch_mlp"
