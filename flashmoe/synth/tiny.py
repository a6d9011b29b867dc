"""Tiny random MoE checkpoints in mlx-community format, built with mlx-lm itself.

Used by the tests (parity against mlx-lm) and as the smallest possible demo.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from flashmoe.synth.tokenizer import write_tokenizer

_QWEN3_5_TEXT: dict[str, Any] = {
    "model_type": "qwen3_5_moe_text",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "rope_parameters": {"type": "default", "rope_theta": 10000000.0,
                        "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]},
}

FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_5_moe": {"model_type": "qwen3_5_moe", "text_config": _QWEN3_5_TEXT},
    "qwen3_next": {
        **{k: v for k, v in _QWEN3_5_TEXT.items() if k != "rope_parameters"},
        "model_type": "qwen3_next", "intermediate_size": 128, "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25, "decoder_sparse_step": 1, "mlp_only_layers": [],
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-6, "num_experts": 16, "num_experts_per_tok": 4,
        "moe_intermediate_size": 64, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "max_position_embeddings": 4096, "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        "model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
}


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


def _router_predicate(path: str, module: nn.Module) -> bool | dict:
    """mlx-community layout: routers and shared-expert gates at 8 bits."""
    if path.endswith("mlp.gate") or path.endswith("shared_expert_gate") or path.endswith(
        "block_sparse_moe.gate"
    ):
        return {"group_size": 64, "bits": 8}
    return True


def build_tiny(
    path: Path | str,
    family: str = "qwen3_5_moe",
    *,
    bits: int = 4,
    group_size: int = 64,
    seed: int = 0,
    vocab_size: int = 512,
    overrides: dict[str, Any] | None = None,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """Write a random, quantized `family` checkpoint to `path` (mlx_lm.load can read it)."""
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    real_vocab = write_tokenizer(path, vocab_size)
    config = copy.deepcopy(FAMILIES[family])
    text = _text_config(config)
    text.update(overrides or {})
    text["vocab_size"] = real_vocab
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    _randomize(model, dtype)
    with contextlib.redirect_stdout(sys.stderr):  # mlx-lm prints "[INFO] Quantized…"
        model, config = quantize_model(
            model, config, group_size, bits, quant_predicate=_router_predicate
        )
    save_model(path, model)
    config["eos_token_id"] = _eos_id(path)
    save_config(config, path / "config.json")
    return path


def _randomize(model: nn.Module, dtype: mx.Dtype) -> None:
    """Scale weights so activations stay O(1) through the layers (random init is tiny)."""
    def fix(p: mx.array) -> mx.array:
        if p.ndim >= 2:
            return (mx.random.normal(p.shape) * (p.shape[-1] ** -0.5)).astype(dtype)
        return p.astype(dtype) if p.dtype != mx.float32 or dtype != mx.float32 else p

    model.update(tree_map(fix, model.parameters()))
    mx.eval(model.parameters())


def _eos_id(path: Path) -> int:
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    return int(vocab["<|im_end|>"])

