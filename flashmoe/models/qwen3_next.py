"""qwen3_next: hybrid Gated DeltaNet / attention, routed + sigmoid-gated shared expert."""
from __future__ import annotations

from flashmoe.models.base import HybridFamily


class Qwen3Next(HybridFamily):
    model_types = ("qwen3_next",)
