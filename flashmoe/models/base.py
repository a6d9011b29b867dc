"""What every MoE family shares: how to walk mlx-lm's model layer by layer.

A family adapter never re-implements attention, norms or the shared expert: it calls
mlx-lm's own modules. It only says where the MoE block lives and how the router picks.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask


class Family:
    """Adapter over one mlx-lm architecture (subclass per model_type)."""

    model_types: tuple[str, ...] = ()
    proxy = False  # True: mlx-lm's own forward with proxied experts (MlxLmFamily)
    batchable = True  # the batched decode step walks layers through this adapter
    moe_attr = "mlp"  # attribute of a decoder layer holding the sparse MoE block

    # ---- structure -------------------------------------------------------------------
    def text_config(self, config: dict) -> dict:
        return config.get("text_config", config)

    def num_experts(self, config: dict) -> int:
        return int(self.text_config(config)["num_experts"])

    def experts_per_token(self, config: dict) -> int:
        return int(self.text_config(config)["num_experts_per_tok"])

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.model.layers)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse block, or None for a dense layer (e.g. mlp_only_layers)."""
        block = getattr(layer, self.moe_attr, None)
        return block if block is not None and hasattr(block, "switch_mlp") else None

    def expert_prefix(self, model: nn.Module, index: int) -> str:
        """Checkpoint name prefix of layer `index`'s stacked experts (…switch_mlp)."""
        return f"model.layers.{index}.{self.moe_attr}.switch_mlp"

    # ---- forward pieces (pure MLX, no eval) --------------------------------------------
    def embed(self, model: nn.Module, ids: mx.array) -> mx.array:
        return model.model.embed_tokens(ids)

    def masks(self, model: nn.Module, h: mx.array, cache: list[Any]) -> list[Any]:
        """One attention mask per layer, exactly as the mlx-lm model would build them."""
        mask = create_attention_mask(h, cache[0])
        return [mask] * len(cache)

    def attention(self, layer: nn.Module, x: mx.array, mask: Any, cache: Any) -> mx.array:
        """x + attn(norm(x)): the residual stream entering the MLP."""
        return x + layer.self_attn(layer.input_layernorm(x), mask, cache)

    def mlp_input(self, layer: nn.Module, h: mx.array) -> mx.array:
        return layer.post_attention_layernorm(h)

    def dense_mlp(self, layer: nn.Module, xn: mx.array) -> mx.array:
        return getattr(layer, self.moe_attr)(xn)

    def route(self, block: nn.Module, xn: mx.array, k: int) -> tuple[mx.array, mx.array]:
        """Top-k expert indices [..., k] and their weights [..., k] (qwen3 style)."""
        gates = mx.softmax(block.gate(xn), axis=-1, precise=True)
        inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        if getattr(block, "norm_topk_prob", False):
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds, scores

    def shared(self, block: nn.Module, xn: mx.array) -> mx.array | None:
        """The always-on shared expert's contribution, or None."""
        if not hasattr(block, "shared_expert"):
            return None
        return mx.sigmoid(block.shared_expert_gate(xn)) * block.shared_expert(xn)

    def combine(self, y: mx.array, scores: mx.array, shared: mx.array | None) -> mx.array:
        """Weighted sum over the k routed outputs y [..., k, D] plus the shared expert."""
        out = (y * scores[..., None]).sum(axis=-2)
        return out if shared is None else out + shared

    def head(self, model: nn.Module, h: mx.array) -> mx.array:
        """Final norm and lm_head (or tied embeddings) → logits."""
        h = model.model.norm(h)
        outer = getattr(model, "language_model", model)
        if getattr(outer, "lm_head", None) is not None and not _tied(outer):
            return outer.lm_head(h)
        return model.model.embed_tokens.as_linear(h)


def _tied(outer: nn.Module) -> bool:
    args = getattr(outer, "args", None)
    return bool(getattr(args, "tie_word_embeddings", False))


class HybridFamily(Family):
    """qwen3_next / qwen3_5: Gated DeltaNet layers with SSM masks, every 4th full attention."""

    def masks(self, model: nn.Module, h: mx.array, cache: list[Any]) -> list[Any]:
        layers = self.layers(model)
        fa = next((i for i, l in enumerate(layers) if not l.is_linear), None)
        ssm = next((i for i, l in enumerate(layers) if l.is_linear), None)
        fa_mask = create_attention_mask(h, cache[fa]) if fa is not None else None
        ssm_mask = create_ssm_mask(h, cache[ssm]) if ssm is not None else None
        return [ssm_mask if l.is_linear else fa_mask for l in layers]

    def attention(self, layer: nn.Module, x: mx.array, mask: Any, cache: Any) -> mx.array:
        attn = layer.linear_attn if layer.is_linear else layer.self_attn
        return x + attn(layer.input_layernorm(x), mask, cache)


class MlxLmFamily(Family):
    """A family run as mlx-lm's own model forward, its SwitchGLU/SwitchMLP replaced by an
    ExpertProxy (models/proxy.py, stages/proxy_step.py): only where its config keeps the
    expert counts is family-specific. Not (yet) on the batched decode path, which walks
    layers through the hand-written adapters above."""

    proxy = True
    batchable = False  # one sequence per step (stages/proxy_step.py); see README's table

    def __init__(self, model_types: tuple[str, ...], experts_key: str = "num_experts",
                 k_key: str = "num_experts_per_tok") -> None:
        self.model_types, self.experts_key, self.k_key = model_types, experts_key, k_key

    def num_experts(self, config: dict) -> int:
        return int(self.text_config(config)[self.experts_key])

    def experts_per_token(self, config: dict) -> int:
        return int(self.text_config(config)[self.k_key])

    def with_k(self, config: dict, k: int) -> dict:
        """mlx-lm `model_config` overrides that make the model's own router pick k experts."""
        if "text_config" in config:
            return {"text_config": {**config["text_config"], self.k_key: k}}
        return {self.k_key: k}

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.layers)
