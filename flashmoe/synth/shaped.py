"""Synthetic Qwen3.5-MoE checkpoints with real shapes, in the mlx-community 4-bit layout.

`build_shaped` writes the text part of Qwen3.5-397B-A17B truncated to a few layers: every
tensor name, dtype, shape, quantization and shard rule is the one `mlx_lm` writes, so an
expert is exactly as many bytes at exactly the kind of offset as in the 209 GB original.
Values are random but scaled so `mlx_lm.load(path)` runs and gives finite logits.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe.constants import BITS, GROUP_SIZES
from flashmoe.errors import ConfigError
from flashmoe.runtime.staging import check_space
from flashmoe.synth.cache import ENV_DIR
from flashmoe.synth.tokenizer import SPECIAL, write_tokenizer
from flashmoe.synth.writer import TensorSpec, dense, quantized, write_checkpoint

TOKENIZER_VOCAB = 4096  # trained BPE size; a larger model vocab is padded (see pad_tokenizer)
ROUTER_QUANT = {"group_size": 64, "bits": 8}  # mlx-lm's qwen3_5 quant_predicate


@dataclass(frozen=True, slots=True)
class Qwen35Dims:
    """Text-model sizes; the defaults are Qwen3.5-397B-A17B's (60 layers there)."""

    layers: int = 4
    hidden: int = 4096
    vocab_size: int = 248320
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 256
    linear_k_heads: int = 16
    linear_v_heads: int = 64
    linear_k_dim: int = 128
    linear_v_dim: int = 128
    conv_kernel: int = 4
    num_experts: int = 512
    experts_per_token: int = 10
    moe_intermediate: int = 1024
    shared_intermediate: int = 1024
    full_attention_interval: int = 4
    rms_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary: float = 0.25
    max_position_embeddings: int = 262144

    def is_full_attention(self, layer: int) -> bool:
        return (layer + 1) % self.full_attention_interval == 0


def validate(dims: Qwen35Dims, bits: int, group_size: int) -> None:
    """Raise ConfigError for sizes mlx-lm could not load or quantize."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits} is not supported for experts; use one of {BITS}")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group_size={group_size} must be 32, 64 or 128 (mlx affine groups)")
    if dims.layers < 1:
        raise ConfigError(f"layers={dims.layers} must be at least 1")
    if not 1 <= dims.experts_per_token <= dims.num_experts:
        raise ConfigError(f"experts_per_token={dims.experts_per_token} must be between 1 and "
                          f"num_experts={dims.num_experts}")
    if dims.vocab_size < 512:
        raise ConfigError(f"vocab_size={dims.vocab_size} must be at least 512 (the byte-level "
                          "BPE needs 256 byte tokens plus merges)")
    if dims.linear_v_heads % dims.linear_k_heads:
        raise ConfigError(f"linear_v_heads={dims.linear_v_heads} must be a multiple of "
                          f"linear_k_heads={dims.linear_k_heads} (Gated DeltaNet groups)")
    ins = (dims.hidden, dims.moe_intermediate, dims.shared_intermediate,
           dims.num_heads * dims.head_dim, dims.linear_v_heads * dims.linear_v_dim)
    if any(n % group_size or n % 64 for n in ins):
        raise ConfigError(f"input widths {ins} must all be multiples of 64 and of "
                          f"group_size={group_size}")


def _near_one(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.9, 1.1, n)  # norms as stored by mlx-lm (already 1 + w)


def _attention(p: str, d: Qwen35Dims, q: dict) -> list[TensorSpec]:
    """Full attention: q_proj also carries the sigmoid output gate (hence 2x)."""
    qd, kvd = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    return [
        *quantized(f"{p}.q_proj", (), 2 * qd, d.hidden, std=d.hidden**-0.5, **q),
        *quantized(f"{p}.k_proj", (), kvd, d.hidden, std=d.hidden**-0.5, **q),
        *quantized(f"{p}.v_proj", (), kvd, d.hidden, std=d.hidden**-0.5, **q),
        *quantized(f"{p}.o_proj", (), d.hidden, qd, std=qd**-0.5, **q),
        dense(f"{p}.q_norm.weight", (d.head_dim,), _near_one),
        dense(f"{p}.k_norm.weight", (d.head_dim,), _near_one),
    ]


def _linear_attention(p: str, d: Qwen35Dims, q: dict) -> list[TensorSpec]:
    """Gated DeltaNet, with conv1d already in mlx's [C, K, 1] layout (so no re-sanitize)."""
    kd, vd, nv = d.linear_k_heads * d.linear_k_dim, d.linear_v_heads * d.linear_v_dim, d.linear_v_heads
    conv = 2 * kd + vd
    return [
        dense(f"{p}.conv1d.weight", (conv, d.conv_kernel, 1),
              lambda r, n: r.normal(0.0, d.conv_kernel**-0.5, n)),
        *quantized(f"{p}.in_proj_qkv", (), conv, d.hidden, std=d.hidden**-0.5, **q),
        *quantized(f"{p}.in_proj_z", (), vd, d.hidden, std=d.hidden**-0.5, **q),
        *quantized(f"{p}.in_proj_b", (), nv, d.hidden, std=d.hidden**-0.5, **q),
        *quantized(f"{p}.in_proj_a", (), nv, d.hidden, std=d.hidden**-0.5, **q),
        dense(f"{p}.dt_bias", (nv,), lambda r, n: r.uniform(0.5, 1.5, n)),
        dense(f"{p}.A_log", (nv,), lambda r, n: np.log(r.uniform(1.0, 16.0, n)), "F32"),
        dense(f"{p}.norm.weight", (d.linear_v_dim,), _near_one),
        *quantized(f"{p}.out_proj", (), d.hidden, vd, std=vd**-0.5, **q),
    ]


def _moe(p: str, d: Qwen35Dims, q: dict, expert_q: dict) -> list[TensorSpec]:
    """Router, the stacked routed experts [E, out, in*bits/32], shared expert and its gate."""
    e, h, m, s = (d.num_experts,), d.hidden, d.moe_intermediate, d.shared_intermediate
    return [
        *quantized(f"{p}.gate", (), d.num_experts, h, std=h**-0.5, **ROUTER_QUANT),
        *quantized(f"{p}.switch_mlp.gate_proj", e, m, h, std=h**-0.5, **expert_q),
        *quantized(f"{p}.switch_mlp.up_proj", e, m, h, std=h**-0.5, **expert_q),
        *quantized(f"{p}.switch_mlp.down_proj", e, h, m, std=m**-0.5, **expert_q),
        *quantized(f"{p}.shared_expert.gate_proj", (), s, h, std=h**-0.5, **q),
        *quantized(f"{p}.shared_expert.up_proj", (), s, h, std=h**-0.5, **q),
        *quantized(f"{p}.shared_expert.down_proj", (), h, s, std=s**-0.5, **q),
        *quantized(f"{p}.shared_expert_gate", (), 1, h, std=h**-0.5, **ROUTER_QUANT),
    ]


def qwen35_specs(dims: Qwen35Dims, bits: int = 4, group_size: int = 64) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in mlx-lm's parameter order (which sets the shards)."""
    validate(dims, bits, group_size)
    q = {"bits": 4, "group_size": group_size}
    expert_q = {"bits": bits, "group_size": group_size}
    root = "language_model.model"
    specs = quantized(f"{root}.embed_tokens", (), dims.vocab_size, dims.hidden, std=1.0, **q)
    for i in range(dims.layers):
        p = f"{root}.layers.{i}"
        specs += (_attention(f"{p}.self_attn", dims, q) if dims.is_full_attention(i)
                  else _linear_attention(f"{p}.linear_attn", dims, q))
        specs += [dense(f"{p}.input_layernorm.weight", (dims.hidden,), _near_one),
                  dense(f"{p}.post_attention_layernorm.weight", (dims.hidden,), _near_one)]
        specs += _moe(f"{p}.mlp", dims, q, expert_q)
    specs.append(dense(f"{root}.norm.weight", (dims.hidden,), _near_one))
    specs += quantized("language_model.lm_head", (), dims.vocab_size, dims.hidden,
                       std=dims.hidden**-0.5, **q)
    return specs


def qwen35_config(dims: Qwen35Dims, bits: int, group_size: int, eos_id: int) -> dict[str, Any]:
    """config.json as mlx-lm's save_config writes it for an mlx-community qwen3_5_moe."""
    quant: dict[str, Any] = {"group_size": group_size, "bits": 4, "mode": "affine"}
    for i in range(dims.layers):
        p = f"language_model.model.layers.{i}.mlp"
        quant[f"{p}.gate"] = dict(ROUTER_QUANT)
        quant[f"{p}.shared_expert_gate"] = dict(ROUTER_QUANT)
        if bits != 4:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                quant[f"{p}.switch_mlp.{proj}"] = {"group_size": group_size, "bits": bits}
    rotary_half = int(dims.head_dim * dims.partial_rotary) // 2
    section = [math.ceil(rotary_half * 11 / 32), math.ceil(rotary_half * 11 / 32)]
    section.append(rotary_half - sum(section))  # [11, 11, 10] at head_dim 256
    text = {
        "model_type": "qwen3_5_moe_text", "hidden_size": dims.hidden,
        "num_hidden_layers": dims.layers, "vocab_size": dims.vocab_size,
        "num_attention_heads": dims.num_heads, "num_key_value_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim, "attention_bias": False, "attn_output_gate": True,
        "linear_num_key_heads": dims.linear_k_heads, "linear_num_value_heads": dims.linear_v_heads,
        "linear_key_head_dim": dims.linear_k_dim, "linear_value_head_dim": dims.linear_v_dim,
        "linear_conv_kernel_dim": dims.conv_kernel,
        "full_attention_interval": dims.full_attention_interval,
        "layer_types": ["full_attention" if dims.is_full_attention(i) else "linear_attention"
                        for i in range(dims.layers)],
        "num_experts": dims.num_experts, "num_experts_per_tok": dims.experts_per_token,
        "moe_intermediate_size": dims.moe_intermediate,
        "shared_expert_intermediate_size": dims.shared_intermediate, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "hidden_act": "silu", "rms_norm_eps": dims.rms_eps,
        "max_position_embeddings": dims.max_position_embeddings, "tie_word_embeddings": False,
        "eos_token_id": eos_id, "dtype": "bfloat16",
        "rope_parameters": {"type": "default", "rope_theta": dims.rope_theta,
                            "partial_rotary_factor": dims.partial_rotary,
                            "mrope_section": section, "mrope_interleaved": True},
    }
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "eos_token_id": eos_id,
            "model_type": "qwen3_5_moe", "quantization": quant, "quantization_config": quant,
            "text_config": text, "tie_word_embeddings": False}


def pad_tokenizer(path: Path, vocab_size: int, seed: int = 0) -> None:
    """Grow tokenizer.json's vocab to `vocab_size` with unique pairs of real tokens.

    Why: the model emits ids up to vocab_size; mlx-lm's streaming detokenizer prints "!"
    for ids past the tokenizer and HF decode drops them. Extra BPE vocab entries without a
    merge are never produced by encoding, so prompts tokenize exactly as before, while any
    sampled id decodes to readable sub-word text.
    """
    file = Path(path) / "tokenizer.json"
    tok = json.loads(file.read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in SPECIAL]
    words = [t for t in ordered if re.fullmatch(r"Ġ?[A-Za-z]+", t)]  # Ġ is byte-level space
    base = words if len(words) >= 64 else ordered
    rng, used, next_id = np.random.default_rng(seed), set(vocab), len(vocab)
    assert sorted(vocab.values()) == list(range(len(vocab))), "ids must be dense"
    while next_id < vocab_size:
        for a, b in rng.integers(0, len(base), (2 * (vocab_size - next_id), 2)):
            token = base[a] + base[b]
            if next_id == vocab_size:
                break
            if token not in used:
                used.add(token)
                vocab[token] = next_id
                next_id += 1
    file.write_text(json.dumps(tok, ensure_ascii=False))


def build_qwen35(
    path: Path | str, dims: Qwen35Dims, *, bits: int = 4, group_size: int = 64, seed: int = 0,
    progress: bool = True, label: str = "synthetic qwen3_5_moe",
    hint: str = f"set {ENV_DIR} (or model.path for model=synth) to a folder with more space",
) -> Path:
    """Write tokenizer, config.json and the streamed shards of `dims` into `path`."""
    specs = qwen35_specs(dims, bits, group_size)  # validates before touching the disk
    path = Path(path)
    check_space(path, sum(s.nbytes for s in specs), hint)  # before the first byte
    path.mkdir(parents=True, exist_ok=True)
    base = write_tokenizer(path, min(TOKENIZER_VOCAB, dims.vocab_size))
    if dims.vocab_size > base:
        pad_tokenizer(path, dims.vocab_size, seed)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    config = qwen35_config(dims, bits, group_size, eos_id=int(vocab["<|im_end|>"]))
    (path / "config.json").write_text(json.dumps(config, indent=4))
    write_checkpoint(path, specs, seed=seed, progress=progress, label=label)
    return path


def shaped_dims(layers: int = 4, num_experts: int = 512, experts_per_token: int = 10,
                vocab_size: int = 248320) -> Qwen35Dims:
    return replace(Qwen35Dims(), layers=layers, num_experts=num_experts,
                   experts_per_token=experts_per_token, vocab_size=vocab_size)


def build_shaped(
    path: Path | str, *, layers: int = 4, num_experts: int = 512, experts_per_token: int = 10,
    bits: int = 4, group_size: int = 64, vocab_size: int = 248320, progress: bool = True,
    seed: int = 0,
) -> Path:
    """Qwen3.5-397B-A17B's real text shapes truncated to `layers` (4 layers ≈ 16 GB)."""
    dims = shaped_dims(layers, num_experts, experts_per_token, vocab_size)
    return build_qwen35(path, dims, bits=bits, group_size=group_size, seed=seed,
                        progress=progress, label=f"shaped qwen3.5 L={layers}")


def shaped_checkpoint(
    layers: int, experts_per_token: int, bits: int, vocab_size: int, num_experts: int = 512,
    *, cache_dir: Path | str | None = None, progress: bool = True,
) -> Path:
    """`build_shaped` once per parameter set, reused from the flashmoe cache afterwards."""
    from flashmoe.synth.cache import cached_checkpoint

    params = {"layers": layers, "experts_per_token": experts_per_token, "bits": bits,
              "vocab_size": vocab_size, "num_experts": num_experts, "group_size": 64, "seed": 0}
    return cached_checkpoint("shaped", params,
                             lambda p: build_shaped(p, progress=progress, **params),
                             cache_dir=cache_dir)
